/**
 * SnapshotImage: the point-in-time view of one device in a taken snapshot (the seed's snapimage), readable
 * and writable. Size is fixed at take. Reads come from the difference storage for stored chunks and from
 * the origin (under the chunk lock) for the rest; writes preserve the chunk, then land in the storage copy,
 * and the origin never changes. Writes mark CBT with set_both, so the next backup re-reads what was
 * changed through the image. All chunk logic and locking live in DiffArea; this stage only adapts the
 * BlockDevice interface and marks CBT.
 *
 * After the snapshot is corrupted or destroyed every request fails with EIO. Not done yet: trim (the NBD
 * face does not advertise it) and extents (every range reports as data).
 */
import type { BlockDevice, Capabilities, WriteFlags, ZeroFlags } from "../block/device.js";
import { BlockError } from "../block/errors.js";
import type { CbtMap } from "../cbt/cbt-map.js";
import type { DiffArea } from "./diff-area.js";

export class SnapshotImage implements BlockDevice {
  readonly sizeBytes: number;
  readonly capabilities: Capabilities = {
    canWrite: true,
    canFlush: true,
    canFua: true,
    canTrim: false,
    canZero: true,
    canFastZero: false,
    canExtents: false,
    canMultiConn: true,
  };
  readonly diffArea: DiffArea;
  private readonly cbt: CbtMap;

  constructor(diffArea: DiffArea, cbt: CbtMap) {
    this.diffArea = diffArea;
    this.cbt = cbt;
    this.sizeBytes = diffArea.sizeBytes;
  }

  read(offsetBytes: number, target: Uint8Array): Promise<void> {
    return this.diffArea.readImage(offsetBytes, target);
  }

  async write(offsetBytes: number, source: Uint8Array, flags?: WriteFlags): Promise<void> {
    this.markCbt(offsetBytes, source.byteLength);
    await this.diffArea.writeImage(offsetBytes, source);
    if (flags?.fua) await this.diffArea.flushImage();
  }

  async writeZeroes(offsetBytes: number, lengthBytes: number, flags?: ZeroFlags): Promise<void> {
    if (flags?.fastZero) throw new BlockError("ENOTSUP", "fast zero is not supported by snapshot images");
    this.markCbt(offsetBytes, lengthBytes);
    await this.diffArea.writeZeroesImage(offsetBytes, lengthBytes);
    if (flags?.fua) await this.diffArea.flushImage();
  }

  async trim(_offsetBytes: number, _lengthBytes: number): Promise<void> {
    throw new BlockError("ENOTSUP", "trim is not supported by snapshot images");
  }

  flush(): Promise<void> {
    return this.diffArea.flushImage();
  }

  private markCbt(offsetBytes: number, lengthBytes: number): void {
    try {
      this.cbt.setBoth(offsetBytes, lengthBytes);
    } catch (error) {
      // A corrupted map (BlockError) is reset at the next take; the image write must not fail for it.
      // Anything else, a broken invariant above all, is not ours to swallow.
      if (!(error instanceof BlockError)) throw error;
    }
  }
}

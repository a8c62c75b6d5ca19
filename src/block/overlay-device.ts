/**
 * OverlayDevice: a writable view of a read-only device (a mounted backup) whose writes go to a scratch
 * device of the same size and never reach the base, like qemu's `-snapshot` overlay. Granularity is a
 * block of `blockBytes` (default 64 KiB): a block is read from the base until its first write, and from
 * the scratch device after. A first write that covers a block only in part copies the block up first
 * (read from the base, merged with the new bytes, written whole), so the scratch holds whole blocks.
 *
 * Locking: every write holds the KeyedMutex of each block it touches (taken in ascending order, so two
 * writes never deadlock), so a copy-up never races another write of the same block. A block's bit is set
 * only after its bytes are on the scratch device; a read that runs meanwhile reads the base, which is what
 * the block held before the write completed. The bitmap costs one bit per block, in memory only: the
 * overlay is thrown away with the device (nothing is persisted). Trim is not offered; write-zeroes writes
 * zeroes to the scratch. Not done yet: extents, and keeping an overlay across restarts.
 */
import { assert } from "../util/assert.js";
import { KeyedMutex, type Release } from "../util/keyed-mutex.js";
import type { BlockDevice, Capabilities, WriteFlags } from "./device.js";

export const overlayBlockBytesDefault = 64 * 1024;
/** Zeroes are written in slices of this size. */
const zeroSliceBytes = 1024 * 1024;

export class OverlayDevice implements BlockDevice {
  readonly sizeBytes: number;
  readonly capabilities: Capabilities = {
    canWrite: true,
    canFlush: true,
    canFua: false,
    canTrim: false,
    canZero: true,
    canFastZero: false,
    canExtents: false,
    canMultiConn: true,
  };
  private readonly base: BlockDevice;
  private readonly scratch: BlockDevice;
  private readonly blockBytes: number;
  /** One bit per block: set once the block lives on the scratch device. */
  private readonly written: Uint8Array;
  private readonly locks = new KeyedMutex();
  private zeroes: Uint8Array | null = null;

  constructor(base: BlockDevice, scratch: BlockDevice, blockBytes = overlayBlockBytesDefault) {
    assert(scratch.sizeBytes >= base.sizeBytes, "the scratch device holds the whole base");
    assert(scratch.capabilities.canWrite, "the scratch device is writable");
    assert(Number.isInteger(blockBytes) && blockBytes > 0, "a positive block size");
    this.base = base;
    this.scratch = scratch;
    this.blockBytes = blockBytes;
    this.sizeBytes = base.sizeBytes;
    this.written = new Uint8Array(Math.ceil(Math.ceil(base.sizeBytes / blockBytes) / 8));
  }

  /** Blocks written so far (tests and status). */
  get writtenBlocks(): number {
    let count = 0;
    for (const byte of this.written) {
      for (let bits = byte; bits !== 0; bits &= bits - 1) count++;
    }
    return count;
  }

  async read(offsetBytes: number, target: Uint8Array): Promise<void> {
    const endBytes = offsetBytes + target.byteLength;
    const reads: Promise<void>[] = [];
    let runStartBytes = offsetBytes;
    while (runStartBytes < endBytes) {
      const fromScratch = this.isWritten(this.blockOf(runStartBytes));
      let runEndBytes = Math.min(endBytes, this.blockEnd(this.blockOf(runStartBytes)));
      while (runEndBytes < endBytes && this.isWritten(this.blockOf(runEndBytes)) === fromScratch) {
        runEndBytes = Math.min(endBytes, this.blockEnd(this.blockOf(runEndBytes)));
      }
      const device = fromScratch ? this.scratch : this.base;
      const part = target.subarray(runStartBytes - offsetBytes, runEndBytes - offsetBytes);
      reads.push(device.read(runStartBytes, part));
      runStartBytes = runEndBytes;
    }
    await Promise.all(reads);
  }

  async write(offsetBytes: number, source: Uint8Array, _flags?: WriteFlags): Promise<void> {
    const endBytes = offsetBytes + source.byteLength;
    const first = this.blockOf(offsetBytes);
    const last = this.blockOf(endBytes - 1);
    const releases: Release[] = [];
    try {
      for (let block = first; block <= last; block++) releases.push(await this.locks.lock(block));
      const steps: Promise<void>[] = [];
      let directStartBytes = offsetBytes;
      let directEndBytes = endBytes;
      if (this.needsCopyUp(first, offsetBytes, endBytes)) {
        steps.push(this.copyUp(first, offsetBytes, source));
        directStartBytes = Math.min(this.blockEnd(first), endBytes);
      }
      if (last !== first && this.needsCopyUp(last, offsetBytes, endBytes)) {
        steps.push(this.copyUp(last, offsetBytes, source));
        directEndBytes = this.blockStart(last);
      }
      if (directEndBytes > directStartBytes) {
        const part = source.subarray(directStartBytes - offsetBytes, directEndBytes - offsetBytes);
        steps.push(this.scratch.write(directStartBytes, part));
      }
      await Promise.all(steps);
      for (let block = first; block <= last; block++) this.markWritten(block);
    } finally {
      for (const release of releases) release();
    }
  }

  async writeZeroes(offsetBytes: number, lengthBytes: number): Promise<void> {
    this.zeroes ??= new Uint8Array(zeroSliceBytes);
    for (let doneBytes = 0; doneBytes < lengthBytes; doneBytes += zeroSliceBytes) {
      const stepBytes = Math.min(zeroSliceBytes, lengthBytes - doneBytes);
      await this.write(offsetBytes + doneBytes, this.zeroes.subarray(0, stepBytes));
    }
  }

  async trim(): Promise<void> {
    assert(false, "trim is not offered by an overlay");
  }

  flush(): Promise<void> {
    return this.scratch.flush();
  }

  /** A block the write covers only in part and that still lives on the base. */
  private needsCopyUp(block: number, offsetBytes: number, endBytes: number): boolean {
    if (this.isWritten(block)) return false;
    return offsetBytes > this.blockStart(block) || endBytes < this.blockEnd(block);
  }

  /** Writes `block` whole to the scratch device: the base's bytes with the write's part over them. */
  private async copyUp(block: number, offsetBytes: number, source: Uint8Array): Promise<void> {
    const blockStartBytes = this.blockStart(block);
    const whole = new Uint8Array(this.blockEnd(block) - blockStartBytes);
    await this.base.read(blockStartBytes, whole);
    const fromBytes = Math.max(offsetBytes, blockStartBytes);
    const toBytes = Math.min(offsetBytes + source.byteLength, this.blockEnd(block));
    whole.set(source.subarray(fromBytes - offsetBytes, toBytes - offsetBytes), fromBytes - blockStartBytes);
    await this.scratch.write(blockStartBytes, whole);
  }

  private blockOf(offsetBytes: number): number {
    return Math.floor(offsetBytes / this.blockBytes);
  }

  private blockStart(block: number): number {
    return block * this.blockBytes;
  }

  /** End of `block`, short for the last block of a size that is not a multiple of blockBytes. */
  private blockEnd(block: number): number {
    return Math.min(this.sizeBytes, (block + 1) * this.blockBytes);
  }

  private isWritten(block: number): boolean {
    return ((this.written[block >> 3] ?? 0) & (1 << (block & 7))) !== 0;
  }

  private markWritten(block: number): void {
    const index = block >> 3;
    this.written[index] = (this.written[index] ?? 0) | (1 << (block & 7));
  }
}

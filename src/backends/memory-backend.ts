/**
 * MemoryBackend: a RAM disk. Storage is sparse: pages are allocated on first write and dropped again by
 * trim and by zero writes that cover whole pages, so extents() can report real holes. Single-threaded
 * JavaScript needs no locks here; overlapping requests in flight resolve in arrival order.
 *
 * An optional `yieldCount` hook lets tests interleave concurrent requests (each operation awaits that
 * many macrotasks before touching the data), which is how the race and model tests shake out ordering
 * bugs in the stages above.
 */

import type { BlockDevice, Capabilities, Extent, WriteFlags, ZeroFlags } from "../block/device.js";
import { assert } from "../util/assert.js";

export const memoryPageSizeBytes = 64 * 1024;

export interface MemoryBackendOptions {
  /**
   * Await this many macrotasks before each operation, so concurrent requests interleave (tests; `() => 1`
   * for a fixed latency, a seeded PRNG for random latency).
   */
  readonly yieldCount?: () => number;
}

export class MemoryBackend implements BlockDevice {
  readonly sizeBytes: number;
  readonly capabilities: Capabilities = {
    canWrite: true,
    canFlush: true,
    canFua: true,
    canTrim: true,
    canZero: true,
    canFastZero: true,
    canExtents: true,
    canMultiConn: true,
  };
  private readonly pages = new Map<number, Uint8Array>();
  private readonly yieldCount: (() => number) | undefined;

  constructor(sizeBytes: number, options: MemoryBackendOptions = {}) {
    assert(Number.isSafeInteger(sizeBytes) && sizeBytes >= 0, "MemoryBackend size must be a safe integer");
    this.sizeBytes = sizeBytes;
    this.yieldCount = options.yieldCount;
  }

  /** Bytes of RAM held by allocated pages. */
  get allocatedBytes(): number {
    return this.pages.size * memoryPageSizeBytes;
  }

  async read(offsetBytes: number, target: Uint8Array): Promise<void> {
    await this.maybeYield();
    this.readSync(offsetBytes, target);
  }

  readSync(offsetBytes: number, target: Uint8Array): void {
    assert(offsetBytes + target.byteLength <= this.sizeBytes, "MemoryBackend read past the end");
    let doneBytes = 0;
    while (doneBytes < target.byteLength) {
      const positionBytes = offsetBytes + doneBytes;
      const pageIndex = Math.floor(positionBytes / memoryPageSizeBytes);
      const inPageBytes = positionBytes - pageIndex * memoryPageSizeBytes;
      const stepBytes = Math.min(memoryPageSizeBytes - inPageBytes, target.byteLength - doneBytes);
      const page = this.pages.get(pageIndex);
      const piece = target.subarray(doneBytes, doneBytes + stepBytes);
      if (page) piece.set(page.subarray(inPageBytes, inPageBytes + stepBytes));
      else piece.fill(0);
      doneBytes += stepBytes;
    }
  }

  async write(offsetBytes: number, source: Uint8Array, _flags?: WriteFlags): Promise<void> {
    await this.maybeYield();
    this.writeSync(offsetBytes, source);
  }

  writeSync(offsetBytes: number, source: Uint8Array): void {
    assert(offsetBytes + source.byteLength <= this.sizeBytes, "MemoryBackend write past the end");
    let doneBytes = 0;
    while (doneBytes < source.byteLength) {
      const positionBytes = offsetBytes + doneBytes;
      const pageIndex = Math.floor(positionBytes / memoryPageSizeBytes);
      const inPageBytes = positionBytes - pageIndex * memoryPageSizeBytes;
      const stepBytes = Math.min(memoryPageSizeBytes - inPageBytes, source.byteLength - doneBytes);
      let page = this.pages.get(pageIndex);
      if (!page) {
        page = new Uint8Array(memoryPageSizeBytes);
        this.pages.set(pageIndex, page);
      }
      page.set(source.subarray(doneBytes, doneBytes + stepBytes), inPageBytes);
      doneBytes += stepBytes;
    }
  }

  async writeZeroes(offsetBytes: number, lengthBytes: number, _flags?: ZeroFlags): Promise<void> {
    await this.maybeYield();
    this.zeroRange(offsetBytes, lengthBytes);
  }

  async trim(offsetBytes: number, lengthBytes: number, _flags?: WriteFlags): Promise<void> {
    await this.maybeYield();
    this.zeroRange(offsetBytes, lengthBytes);
  }

  async flush(): Promise<void> {
    await this.maybeYield();
  }

  async extents(offsetBytes: number, lengthBytes: number): Promise<Extent[]> {
    await this.maybeYield();
    const extents: Extent[] = [];
    const endBytes = offsetBytes + lengthBytes;
    let positionBytes = offsetBytes;
    while (positionBytes < endBytes) {
      const pageIndex = Math.floor(positionBytes / memoryPageSizeBytes);
      const pageEndBytes = Math.min((pageIndex + 1) * memoryPageSizeBytes, endBytes);
      const isHole = !this.pages.has(pageIndex);
      const stepBytes = pageEndBytes - positionBytes;
      const last = extents[extents.length - 1];
      if (last && last.isHole === isHole) {
        extents[extents.length - 1] = { lengthBytes: last.lengthBytes + stepBytes, isHole, isZero: isHole };
      } else {
        extents.push({ lengthBytes: stepBytes, isHole, isZero: isHole });
      }
      positionBytes = pageEndBytes;
    }
    return extents;
  }

  private zeroRange(offsetBytes: number, lengthBytes: number): void {
    assert(offsetBytes + lengthBytes <= this.sizeBytes, "MemoryBackend zero past the end");
    const endBytes = offsetBytes + lengthBytes;
    let positionBytes = offsetBytes;
    while (positionBytes < endBytes) {
      const pageIndex = Math.floor(positionBytes / memoryPageSizeBytes);
      const pageStartBytes = pageIndex * memoryPageSizeBytes;
      const stepEndBytes = Math.min(pageStartBytes + memoryPageSizeBytes, endBytes);
      const page = this.pages.get(pageIndex);
      if (page) {
        if (positionBytes === pageStartBytes && stepEndBytes === pageStartBytes + memoryPageSizeBytes) {
          this.pages.delete(pageIndex);
        } else {
          page.fill(0, positionBytes - pageStartBytes, stepEndBytes - pageStartBytes);
        }
      }
      positionBytes = stepEndBytes;
    }
  }

  private maybeYield(): Promise<void> | undefined {
    return this.yieldCount ? yieldMacrotasks(this.yieldCount()) : undefined;
  }
}

async function yieldMacrotasks(count: number): Promise<void> {
  for (let i = 0; i < count; i++) await new Promise((resolve) => setImmediate(resolve));
}

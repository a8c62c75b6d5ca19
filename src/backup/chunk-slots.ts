/**
 * ChunkSlots: reusable buffer pairs for chunks in flight (a plain chunk and its stored object), each a view
 * of a SharedArrayBuffer, so the codec workers read and write them in place: no copy through postMessage
 * and no fresh multi-MiB allocation per chunk. On this kind of VM a fresh 4 MiB buffer costs ~10 ms of CPU
 * in page faults, more than hashing and compressing it (BENCHMARKS.md, "Local backup repository").
 *
 * A slot belongs to one chunk from take() to give(); the callers' bounded concurrency (a few chunks in
 * flight) bounds how many slots exist. Slots are never shrunk; the set dies with its owner (one backup,
 * restore or mounted image).
 */
import { BlockError } from "../block/errors.js";
import { storedBytesBound } from "./chunk-codec.js";

/** The callers' own bound is the store's hint, up to 1024 (--s3-parallel); this only catches a missing one. */
const slotsMaxDefault = 1024;

export interface ChunkSlot {
  /** chunkSizeBytes of plain data. */
  readonly plain: Uint8Array;
  /** Room for the stored object of a full chunk (storedBytesBound). */
  readonly stored: Uint8Array;
}

export class ChunkSlots {
  readonly chunkSizeBytes: number;
  private readonly free: ChunkSlot[] = [];
  private readonly slotsMax: number;
  private count = 0;

  constructor(chunkSizeBytes: number, slotsMax = slotsMaxDefault) {
    this.chunkSizeBytes = chunkSizeBytes;
    this.slotsMax = slotsMax;
  }

  take(): ChunkSlot {
    const reused = this.free.pop();
    if (reused !== undefined) return reused;
    if (this.count >= this.slotsMax)
      throw new BlockError(
        "EINVAL",
        `More than ${this.slotsMax} chunks in flight (a caller's bound is missing)`,
      );
    this.count += 1;
    return {
      plain: new Uint8Array(new SharedArrayBuffer(this.chunkSizeBytes)),
      stored: new Uint8Array(new SharedArrayBuffer(storedBytesBound(this.chunkSizeBytes))),
    };
  }

  give(slot: ChunkSlot): void {
    this.free.push(slot);
  }
}

/**
 * DiffArea: the copy-before-write state of one device in one taken snapshot (blksnap's diff_area).
 *
 * Chunk states (sparse map, an entry only for touched chunks):
 *   absent  - the snapshot's data is still on the origin
 *   stored  - the snapshot's data is in the difference storage at `location` (preserved by an origin
 *             write, or written through the image); the origin is never read for it again
 *   failed  - preserving it failed under policy break-snapshot; the whole area is corrupted
 *
 * Locking: one FIFO mutex per chunk (KeyedMutex), taken by (1) an origin write that must preserve an
 * absent chunk, held while the chunk is read from the origin and written to the storage; (2) an image read
 * of an absent chunk, held while it reads the origin, so an origin write to that chunk waits and the image
 * can never see post-snapshot bytes; (3) an image write, held for the whole read-modify-write. Reads of
 * stored chunks take no lock: a stored location never changes.
 *
 * Failure policy: `break-snapshot` (default) marks the chunk failed, corrupts the area (first errno wins,
 * one `corrupted` event) and lets the origin write proceed; `fail-origin-write` leaves the chunk absent
 * and fails the origin write, keeping the snapshot valid. After corruption or destroy every image request
 * fails with EIO. An image write that finds the storage full fails with ENOSPC and leaves the snapshot
 * valid (blksnap corrupts it; refusing the one write loses nothing).
 *
 * Reads of neighbouring absent chunks are merged into one origin read under all their locks, taken in
 * ascending order (the only place that holds more than one lock; see readOriginRun).
 *
 * Not done yet: chunks are not cached in RAM (each image read of a stored chunk reads the storage; the
 * page cache serves it).
 */

import type { BlockDevice } from "../block/device.js";
import { BlockError, type Errno, toBlockError } from "../block/errors.js";
import type { DiffStorage, StorageLocation } from "../storage/diff-storage.js";
import { assert } from "../util/assert.js";
import { KeyedMutex } from "../util/keyed-mutex.js";
import { copyBytes } from "../util/shared-copy.js";
import { ChunkGeometry, type ChunkPiece } from "./chunk-geometry.js";

/** What a failed copy-before-write does: break the snapshot (default) or fail the origin write. */
export type OnCowError = "break-snapshot" | "fail-origin-write";

const failedChunk = "failed" as const;
/** The chunk map's value for a failed chunk; stored chunks hold DiffStorage location codes (≥ 0). */
const failedCode = -1;
/**
 * Free chunk buffers kept per area: enough for the copies of a deep queue (QD16 and more) at once, bounded
 * in bytes for large chunks.
 */
const chunkBuffersPooledMax = 32;
const chunkBufferPoolBytesMax = 4 * 1024 * 1024;
type ChunkEntry = StorageLocation | typeof failedChunk;

export interface DiffAreaOptions {
  readonly deviceName: string;
  /** The origin's backend, below its tracker: reads here are not tracked. */
  readonly origin: BlockDevice;
  readonly sizeBytes: number;
  readonly chunkSizeBytes: number;
  readonly storage: DiffStorage;
  readonly onCowError: OnCowError;
  readonly onCorrupted: (errno: Errno) => void;
  /**
   * Records a stored chunk durably enough to survive the process (the snapshot keeper's chunk log): called
   * after the chunk's data is written and before the origin write it protects goes on. A failure counts as
   * a failed copy.
   */
  readonly onStored?: (chunkIndex: number, locationCode: number) => Promise<void>;
}

export class DiffArea {
  readonly deviceName: string;
  readonly geometry: ChunkGeometry;
  private readonly origin: BlockDevice;
  private readonly storage: DiffStorage;
  private readonly onCowError: OnCowError;
  private readonly onCorrupted: (errno: Errno) => void;
  private readonly onStored: ((chunkIndex: number, locationCode: number) => Promise<void>) | undefined;
  /** Touched chunks only: one location code each (~37-53 B with the Map's own cost), decoded on use. */
  private readonly chunks = new Map<number, number>();
  private readonly locks = new KeyedMutex();
  private corruptedErrno: Errno | null = null;
  private destroyed = false;
  private inflightCount = 0;
  private idleWaiters: Array<() => void> = [];
  private zeroChunk: Uint8Array | undefined;
  private storedCount = 0;
  /** Chunks preserved by copy-before-write (origin writes; not image writes), and their bytes. */
  private copiedCount = 0;
  private copiedByteCount = 0;
  /**
   * Free chunk buffers: copy-before-write under load would otherwise allocate one per chunk (GC pauses).
   * With a file storage they live in SharedArrayBuffers, so its writer thread writes a copied chunk from
   * where it is instead of first copying it into its staging buffer (src/backends/fs-writer.ts). Under
   * QD16 a pool of 8 left half the copies allocating a fresh 64 KiB buffer: ~30 µs each in allocation and
   * GC of external memory (engine logic alone, devices that do nothing: 33 µs per first touch, 3 µs with
   * the pool of 32).
   */
  private readonly bufferPool: Uint8Array[] = [];
  private readonly bufferPoolMax: number;

  constructor(options: DiffAreaOptions) {
    this.deviceName = options.deviceName;
    this.geometry = new ChunkGeometry(options.sizeBytes, options.chunkSizeBytes);
    this.origin = options.origin;
    this.storage = options.storage;
    this.onCowError = options.onCowError;
    this.onCorrupted = options.onCorrupted;
    this.onStored = options.onStored;
    this.bufferPoolMax = Math.max(
      1,
      Math.min(chunkBuffersPooledMax, Math.floor(chunkBufferPoolBytesMax / options.chunkSizeBytes)),
    );
    assert(options.sizeBytes <= options.origin.sizeBytes, "an image cannot be larger than its origin");
  }

  get sizeBytes(): number {
    return this.geometry.deviceSizeBytes;
  }

  get error(): Errno | null {
    return this.corruptedErrno;
  }

  get isDestroyed(): boolean {
    return this.destroyed;
  }

  get storedChunkCount(): number {
    return this.storedCount;
  }

  /** Chunks copied from the origin before an origin write overwrote them, and the bytes copied. */
  get copyStats(): { readonly chunks: number; readonly bytes: number } {
    return { chunks: this.copiedCount, bytes: this.copiedByteCount };
  }

  /** Number of chunk entries in memory (touched chunks), for memory accounting. */
  get chunkEntryCount(): number {
    return this.chunks.size;
  }

  isChunkStored(chunkIndex: number): boolean {
    const code = this.chunks.get(chunkIndex);
    return code !== undefined && code !== failedCode;
  }

  // ---- origin write path (called by the Tracker before it writes the origin) ----

  /**
   * Preserves every absent chunk overlapped by an origin write. Throws (rejects) only under
   * fail-origin-write.
   *
   * Fast path: when every chunk the write overlaps is already in the map (stored, or failed in an area that
   * is then corrupted), the write needs nothing from this area and gets undefined — no promise, no lock,
   * nothing counted. This is safe because a chunk enters the map only under its lock and only after its
   * copy is written (setStored, after storeNew), so an origin write racing the copy of its chunk still
   * finds it absent and waits for the lock in preserveChunk; and a stored chunk never leaves the map.
   */
  preserveForOriginWrite(offsetBytes: number, lengthBytes: number): Promise<void> | undefined {
    if (this.corruptedErrno !== null || this.destroyed) return undefined;
    const endBytes = Math.min(offsetBytes + lengthBytes, this.sizeBytes);
    if (offsetBytes >= endBytes) return undefined;
    const firstChunk = Math.floor(offsetBytes / this.geometry.chunkSizeBytes);
    const lastChunk = Math.floor((endBytes - 1) / this.geometry.chunkSizeBytes);
    for (let chunkIndex = firstChunk; chunkIndex <= lastChunk; chunkIndex++) {
      if (!this.chunks.has(chunkIndex)) return this.preserveAbsent(chunkIndex, lastChunk);
    }
    return undefined;
  }

  /** The slow path: preserves the absent chunks from firstAbsent (absent) to lastChunk. */
  private async preserveAbsent(firstAbsent: number, lastChunk: number): Promise<void> {
    const pending: Promise<void>[] = [];
    for (let chunkIndex = firstAbsent; chunkIndex <= lastChunk; chunkIndex++) {
      if (this.chunks.has(chunkIndex)) continue;
      pending.push(this.preserveChunk(chunkIndex));
    }
    this.enter();
    try {
      const results = await Promise.allSettled(pending);
      for (const result of results) if (result.status === "rejected") throw result.reason;
    } finally {
      this.leave();
    }
  }

  private async preserveChunk(chunkIndex: number): Promise<void> {
    const release = await this.locks.lock(chunkIndex);
    try {
      if (this.chunks.has(chunkIndex) || this.corruptedErrno !== null || this.destroyed) return;
      const startBytes = this.geometry.chunkStartBytes(chunkIndex);
      const buffer = this.takeBuffer(this.geometry.chunkLengthBytes(chunkIndex));
      try {
        await this.origin.read(startBytes, buffer);
        this.setStored(chunkIndex, await this.storeNew(chunkIndex, buffer));
        this.copiedCount++;
        this.copiedByteCount += buffer.byteLength;
      } catch (error) {
        const blockError = toBlockError(error, `copy-before-write of ${this.deviceName} chunk ${chunkIndex}`);
        if (this.onCowError === "fail-origin-write") throw blockError;
        assert(!this.chunks.has(chunkIndex), "only an absent chunk fails to be preserved");
        this.chunks.set(chunkIndex, failedCode);
        this.setCorrupted(blockError.errno);
      } finally {
        this.giveBuffer(buffer);
      }
    } finally {
      release();
    }
  }

  /**
   * Stores a whole chunk in a new region and records it (onStored); a region whose write or record failed
   * goes back to the storage.
   */
  private async storeNew(chunkIndex: number, chunkData: Uint8Array): Promise<StorageLocation> {
    const location = await this.storage.allocate(chunkData.byteLength);
    try {
      await this.storage.write(location, 0, chunkData);
      await this.onStored?.(chunkIndex, this.storage.locationCode(location));
    } catch (error) {
      this.storage.release(location, chunkData.byteLength);
      throw error;
    }
    return location;
  }

  private entry(chunkIndex: number): ChunkEntry | undefined {
    const code = this.chunks.get(chunkIndex);
    if (code === undefined) return undefined;
    if (code === failedCode) return failedChunk;
    return this.storage.locationAt(code);
  }

  private setStored(chunkIndex: number, location: StorageLocation): void {
    assert(this.locks.isLocked(chunkIndex), "a chunk changes state only under its lock");
    assert(!this.chunks.has(chunkIndex), "a chunk is stored once");
    this.chunks.set(chunkIndex, this.storage.locationCode(location));
    this.storedCount++;
    assert(this.storedCount <= this.geometry.chunkCount, "never more stored chunks than chunks");
  }

  private takeBuffer(lengthBytes: number): Uint8Array {
    const pooled = this.bufferPool.pop();
    if (pooled) return pooled.subarray(0, lengthBytes);
    const memory = this.storage.prefersSharedSources
      ? new SharedArrayBuffer(this.geometry.chunkSizeBytes)
      : new ArrayBuffer(this.geometry.chunkSizeBytes);
    return new Uint8Array(memory).subarray(0, lengthBytes);
  }

  private giveBuffer(buffer: Uint8Array): void {
    if (this.bufferPool.length >= this.bufferPoolMax) return;
    this.bufferPool.push(new Uint8Array(buffer.buffer, buffer.byteOffset, this.geometry.chunkSizeBytes));
  }

  // ---- image path (called by SnapshotImage) ----

  async readImage(offsetBytes: number, target: Uint8Array): Promise<void> {
    this.checkUsable();
    this.enter();
    try {
      const reads: Promise<void>[] = [];
      // Consecutive chunks still on the origin are read with one origin read under all their locks.
      let run: ChunkPiece[] = [];
      for (const piece of this.geometry.pieces(offsetBytes, target.byteLength)) {
        const entry = this.entry(piece.chunkIndex);
        if (entry === failedChunk) throw this.usableError();
        if (entry === undefined) {
          run.push(piece);
          continue;
        }
        if (run.length > 0) reads.push(this.readOriginRun(run, target));
        run = [];
        const pieceTarget = target.subarray(
          piece.pieceOffsetBytes,
          piece.pieceOffsetBytes + piece.lengthBytes,
        );
        reads.push(this.storage.read(entry, piece.inChunkBytes, pieceTarget));
      }
      if (run.length > 0) reads.push(this.readOriginRun(run, target));
      await settleAll(reads);
      // Never return data read across a destroy or corruption: the caller gets EIO instead.
      this.checkUsable();
    } finally {
      this.leave();
    }
  }

  /**
   * Reads adjacent pieces whose chunks were absent. Locks are taken in ascending chunk order (every other
   * lock holder holds a single lock, so this cannot deadlock); a chunk stored meanwhile is read from the
   * storage instead.
   */
  private async readOriginRun(run: readonly ChunkPiece[], target: Uint8Array): Promise<void> {
    const releases: Array<() => void> = [];
    try {
      for (const piece of run) releases.push(await this.locks.lock(piece.chunkIndex));
      const first = run[0];
      const last = run[run.length - 1];
      assert(first && last);
      const allAbsent = run.every((piece) => !this.chunks.has(piece.chunkIndex));
      if (allAbsent) {
        const startBytes = this.geometry.chunkStartBytes(first.chunkIndex) + first.inChunkBytes;
        const lengthBytes = last.pieceOffsetBytes + last.lengthBytes - first.pieceOffsetBytes;
        const runTarget = target.subarray(first.pieceOffsetBytes, first.pieceOffsetBytes + lengthBytes);
        await this.origin.read(startBytes, runTarget);
        return;
      }
      await settleAll(
        run.map(async (piece) => {
          const pieceTarget = target.subarray(
            piece.pieceOffsetBytes,
            piece.pieceOffsetBytes + piece.lengthBytes,
          );
          const entry = this.entry(piece.chunkIndex);
          if (entry === failedChunk) throw this.usableError();
          if (entry) await this.storage.read(entry, piece.inChunkBytes, pieceTarget);
          else
            await this.origin.read(
              this.geometry.chunkStartBytes(piece.chunkIndex) + piece.inChunkBytes,
              pieceTarget,
            );
        }),
      );
    } finally {
      for (const release of releases) release();
    }
  }

  async writeImage(offsetBytes: number, source: Uint8Array): Promise<void> {
    this.checkUsable();
    this.enter();
    try {
      const pieces: Promise<void>[] = [];
      for (const piece of this.geometry.pieces(offsetBytes, source.byteLength)) {
        const pieceSource = source.subarray(
          piece.pieceOffsetBytes,
          piece.pieceOffsetBytes + piece.lengthBytes,
        );
        pieces.push(this.writePiece(piece.chunkIndex, piece.inChunkBytes, pieceSource));
      }
      await settleAll(pieces);
    } finally {
      this.leave();
    }
  }

  /** Writes zeroes chunk by chunk, reusing one zero buffer, so huge requests need no huge allocation. */
  async writeZeroesImage(offsetBytes: number, lengthBytes: number): Promise<void> {
    this.checkUsable();
    this.zeroChunk ??= new Uint8Array(this.geometry.chunkSizeBytes);
    const zeroes = this.zeroChunk;
    this.enter();
    try {
      for (const piece of this.geometry.pieces(offsetBytes, lengthBytes)) {
        await this.writePiece(piece.chunkIndex, piece.inChunkBytes, zeroes.subarray(0, piece.lengthBytes));
      }
    } finally {
      this.leave();
    }
  }

  private async writePiece(chunkIndex: number, inChunkBytes: number, source: Uint8Array): Promise<void> {
    const release = await this.locks.lock(chunkIndex);
    try {
      this.checkUsable();
      const entry = this.entry(chunkIndex);
      if (entry === failedChunk) throw this.usableError();
      if (entry) {
        await this.storage.write(entry, inChunkBytes, source);
        return;
      }
      const chunkLengthBytes = this.geometry.chunkLengthBytes(chunkIndex);
      if (source.byteLength === chunkLengthBytes) {
        this.setStored(chunkIndex, await this.storeNew(chunkIndex, source));
        return;
      }
      const chunkData = this.takeBuffer(chunkLengthBytes);
      try {
        await this.origin.read(this.geometry.chunkStartBytes(chunkIndex), chunkData);
        copyBytes(chunkData, inChunkBytes, source);
        this.setStored(chunkIndex, await this.storeNew(chunkIndex, chunkData));
      } finally {
        this.giveBuffer(chunkData);
      }
    } finally {
      release();
    }
  }

  async flushImage(): Promise<void> {
    this.checkUsable();
    await this.storage.flush();
  }

  // ---- lifecycle ----

  /** First error wins; later ones are ignored (blksnap's test_and_set_bit). */
  setCorrupted(errno: Errno): void {
    if (this.corruptedErrno !== null) return;
    this.corruptedErrno = errno;
    this.onCorrupted(errno);
  }

  /**
   * Recovery (a snapshot kept across a restart): the chunks its chunk log recorded, before any request.
   * A chunk recorded twice keeps its first location (the second record cannot exist: a chunk is stored
   * once); a location outside the storage is refused (the log belongs to another storage).
   */
  restoreStored(entries: Iterable<readonly [chunkIndex: number, locationCode: number]>): void {
    assert(this.inflightCount === 0 && this.storedCount === 0, "restore only into a new diff area");
    for (const [chunkIndex, locationCode] of entries) {
      if (!Number.isSafeInteger(chunkIndex) || chunkIndex < 0 || chunkIndex >= this.geometry.chunkCount)
        throw new BlockError("EINVAL", `chunk ${chunkIndex} of ${this.deviceName} is outside the device`);
      if (this.chunks.has(chunkIndex)) continue;
      this.storage.checkRecordedLocation(locationCode, this.geometry.chunkLengthBytes(chunkIndex));
      this.chunks.set(chunkIndex, locationCode);
      this.storedCount++;
    }
  }

  /** Recovery: the area was corrupted before the restart (its event was already delivered then). */
  restoreCorrupted(errno: Errno): void {
    this.corruptedErrno ??= errno;
  }

  /** Every image request fails with EIO from now on; origin writes stop preserving chunks. */
  markDestroyed(): void {
    this.destroyed = true;
  }

  /** Resolves when no request is inside this area (or after `timeoutMs`). */
  waitIdle(timeoutMs: number): Promise<boolean> {
    if (this.inflightCount === 0) return Promise.resolve(true);
    return new Promise((resolve) => {
      const timer = setTimeout(() => resolve(false), timeoutMs);
      this.idleWaiters.push(() => {
        clearTimeout(timer);
        resolve(true);
      });
    });
  }

  private checkUsable(): void {
    if (this.destroyed || this.corruptedErrno !== null) throw this.usableError();
  }

  private usableError(): BlockError {
    if (this.destroyed) return new BlockError("EIO", `snapshot image of ${this.deviceName} was destroyed`);
    return new BlockError(
      "EIO",
      `snapshot image of ${this.deviceName} is corrupted (${this.corruptedErrno})`,
    );
  }

  private enter(): void {
    this.inflightCount++;
  }

  private leave(): void {
    this.inflightCount--;
    assert(this.inflightCount >= 0);
    if (this.inflightCount === 0 && this.idleWaiters.length > 0) {
      for (const waiter of this.idleWaiters.splice(0)) waiter();
    }
  }
}

/** Awaits every piece (none is left running behind an early failure), then throws the first error. */
async function settleAll(pieces: Promise<void>[]): Promise<void> {
  if (pieces.length === 1) return pieces[0];
  const results = await Promise.allSettled(pieces);
  for (const result of results) if (result.status === "rejected") throw result.reason;
}

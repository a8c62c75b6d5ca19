/**
 * BackupImage: one backup of a repository as a read-only BlockDevice (instant restore: `backup mount`
 * serves it over NBD, so qemu-img, nbdcopy or nbd-client read a backup without restoring it first).
 *
 * A read decodes the chunks it overlaps (the repository's codec checks each against its content id) and
 * keeps the last few decoded chunks, so small sequential reads do not decode a chunk again per request.
 * Zero chunks cost no read. Concurrent reads of the same chunk share one decode. Writes, zeroes and
 * trims fail with EROFS. Not done yet: extents (zero chunks could be reported as holes).
 */
import type { BlockDevice, Capabilities } from "../block/device.js";
import { BlockError } from "../block/errors.js";
import { chunkLengthAt, type Manifest } from "./manifest.js";
import type { Repository } from "./repository.js";

/** Decoded chunks kept (4 MiB each by default: 32 MiB). */
const cachedChunksMax = 8;

export class BackupImage implements BlockDevice {
  readonly sizeBytes: number;
  readonly capabilities: Capabilities = {
    canWrite: false,
    canFlush: false,
    canFua: false,
    canTrim: false,
    canZero: false,
    canFastZero: false,
    canExtents: false,
    canMultiConn: true,
  };
  private readonly repository: Repository;
  private readonly manifest: Manifest;
  /** Chunk index → its decode, most recently used last. */
  private readonly cache = new Map<number, Promise<Uint8Array>>();

  constructor(repository: Repository, manifest: Manifest) {
    this.repository = repository;
    this.manifest = manifest;
    this.sizeBytes = manifest.sizeBytes;
  }

  async read(offsetBytes: number, target: Uint8Array): Promise<void> {
    const chunkSizeBytes = this.manifest.chunkSizeBytes;
    let doneBytes = 0;
    while (doneBytes < target.byteLength) {
      const positionBytes = offsetBytes + doneBytes;
      const chunkIndex = Math.floor(positionBytes / chunkSizeBytes);
      const inChunkBytes = positionBytes - chunkIndex * chunkSizeBytes;
      const pieceBytes = Math.min(chunkSizeBytes - inChunkBytes, target.byteLength - doneBytes);
      const piece = target.subarray(doneBytes, doneBytes + pieceBytes);
      if (this.manifest.chunks[chunkIndex] === null) piece.fill(0);
      else piece.set((await this.chunk(chunkIndex)).subarray(inChunkBytes, inChunkBytes + pieceBytes));
      doneBytes += pieceBytes;
    }
  }

  async write(): Promise<void> {
    throw new BlockError("EROFS", "a backup is read-only");
  }

  async writeZeroes(): Promise<void> {
    throw new BlockError("EROFS", "a backup is read-only");
  }

  async trim(): Promise<void> {
    throw new BlockError("EROFS", "a backup is read-only");
  }

  async flush(): Promise<void> {}

  private chunk(chunkIndex: number): Promise<Uint8Array> {
    const cached = this.cache.get(chunkIndex);
    if (cached) {
      this.cache.delete(chunkIndex);
      this.cache.set(chunkIndex, cached);
      return cached;
    }
    const id = this.manifest.chunks[chunkIndex];
    if (id === undefined || id === null) throw new BlockError("EINVAL", `chunk ${chunkIndex} is not stored`);
    const lengthBytes = chunkLengthAt(this.manifest, chunkIndex);
    const decoding = this.repository.readChunk(id).then((plain) => {
      if (plain.byteLength !== lengthBytes)
        throw new BlockError("EIO", `chunk ${id} holds ${plain.byteLength} bytes, not ${lengthBytes}`);
      return plain;
    });
    // A failed decode is not kept: the next read tries again.
    decoding.catch(() => this.cache.delete(chunkIndex));
    this.cache.set(chunkIndex, decoding);
    if (this.cache.size > cachedChunksMax) {
      const oldest = this.cache.keys().next().value;
      if (oldest !== undefined) this.cache.delete(oldest);
    }
    return decoding;
  }
}

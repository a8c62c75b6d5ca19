/**
 * Copy-before-write chunk geometry: a power of two between 4 KiB and 64 MiB (default 256 KiB, blksnap's
 * chunk_minimum_shift 18). The last chunk of a device whose size is not a multiple is short.
 */
import { assert } from "../util/assert.js";

export const chunkSizeBytesDefault = 256 * 1024;
export const chunkSizeBytesMin = 4096;
export const chunkSizeBytesMax = 64 * 1024 * 1024;

export function isValidChunkSize(chunkSizeBytes: number): boolean {
  return (
    Number.isSafeInteger(chunkSizeBytes) &&
    chunkSizeBytes >= chunkSizeBytesMin &&
    chunkSizeBytes <= chunkSizeBytesMax &&
    (chunkSizeBytes & (chunkSizeBytes - 1)) === 0
  );
}

export class ChunkGeometry {
  readonly chunkSizeBytes: number;
  readonly deviceSizeBytes: number;
  readonly chunkCount: number;

  constructor(deviceSizeBytes: number, chunkSizeBytes: number) {
    assert(isValidChunkSize(chunkSizeBytes), "chunk size must be validated by the caller");
    assert(Number.isSafeInteger(deviceSizeBytes) && deviceSizeBytes >= 0);
    this.chunkSizeBytes = chunkSizeBytes;
    this.deviceSizeBytes = deviceSizeBytes;
    this.chunkCount = Math.ceil(deviceSizeBytes / chunkSizeBytes);
  }

  chunkStartBytes(chunkIndex: number): number {
    assert(chunkIndex >= 0 && chunkIndex < this.chunkCount, "chunk index out of range");
    return chunkIndex * this.chunkSizeBytes;
  }

  /** Length of a chunk: chunkSizeBytes, or less for the last chunk. */
  chunkLengthBytes(chunkIndex: number): number {
    const startBytes = this.chunkStartBytes(chunkIndex);
    return Math.min(this.chunkSizeBytes, this.deviceSizeBytes - startBytes);
  }

  /**
   * Splits [offsetBytes, offsetBytes + lengthBytes) at chunk borders. `pieceOffsetBytes` is the position
   * within the request, `inChunkBytes` the position within the chunk.
   */
  *pieces(offsetBytes: number, lengthBytes: number): Generator<ChunkPiece> {
    assert(lengthBytes > 0 && offsetBytes >= 0);
    assert(offsetBytes + lengthBytes <= this.deviceSizeBytes, "range past the end of the device");
    const endBytes = offsetBytes + lengthBytes;
    let positionBytes = offsetBytes;
    while (positionBytes < endBytes) {
      const chunkIndex = Math.floor(positionBytes / this.chunkSizeBytes);
      const chunkStartBytes = chunkIndex * this.chunkSizeBytes;
      const pieceEndBytes = Math.min(chunkStartBytes + this.chunkSizeBytes, endBytes);
      yield {
        chunkIndex,
        inChunkBytes: positionBytes - chunkStartBytes,
        pieceOffsetBytes: positionBytes - offsetBytes,
        lengthBytes: pieceEndBytes - positionBytes,
      };
      positionBytes = pieceEndBytes;
    }
  }
}

export interface ChunkPiece {
  readonly chunkIndex: number;
  readonly inChunkBytes: number;
  readonly pieceOffsetBytes: number;
  readonly lengthBytes: number;
}

import { AssertionError } from "node:assert";
import assert from "node:assert/strict";
import { test } from "node:test";
import {
  ChunkGeometry,
  type ChunkPiece,
  chunkSizeBytesDefault,
  chunkSizeBytesMax,
  chunkSizeBytesMin,
  isValidChunkSize,
} from "./chunk-geometry.js";

const KiB = 1024;
const MiB = 1024 * KiB;

test("chunk sizes: powers of two from 4 KiB to 64 MiB, default 256 KiB", () => {
  assert.equal(chunkSizeBytesDefault, 256 * KiB);
  assert.equal(chunkSizeBytesMin, 4 * KiB);
  assert.equal(chunkSizeBytesMax, 64 * MiB);
  for (let sizeBytes = 4 * KiB; sizeBytes <= 64 * MiB; sizeBytes *= 2) {
    assert.equal(isValidChunkSize(sizeBytes), true, `${sizeBytes}`);
  }
  for (const sizeBytes of [0, -4096, 3000, 2 * KiB, 128 * MiB, 3 * 4096, 12 * KiB, 4096.5, Number.NaN]) {
    assert.equal(isValidChunkSize(sizeBytes), false, `${sizeBytes}`);
  }
  assert.throws(() => new ChunkGeometry(MiB, 3000), AssertionError);
  assert.throws(() => new ChunkGeometry(MiB, 128 * MiB), AssertionError);
  assert.throws(() => new ChunkGeometry(-1, 4096), AssertionError);
});

test("chunk geometry: count and a short last chunk", () => {
  const geometry = new ChunkGeometry(10 * 4096 + 100, 4096);
  assert.equal(geometry.chunkCount, 11);
  assert.equal(geometry.chunkStartBytes(10), 40960);
  assert.equal(geometry.chunkLengthBytes(0), 4096);
  assert.equal(geometry.chunkLengthBytes(9), 4096);
  assert.equal(geometry.chunkLengthBytes(10), 100);
  assert.throws(() => geometry.chunkLengthBytes(11), AssertionError);
  assert.throws(() => geometry.chunkStartBytes(-1), AssertionError);
  const exact = new ChunkGeometry(4 * MiB, 256 * KiB);
  assert.equal(exact.chunkCount, 16);
  assert.equal(exact.chunkLengthBytes(15), 256 * KiB);
  // Chunks cover the device exactly.
  let totalBytes = 0;
  for (let i = 0; i < geometry.chunkCount; i++) totalBytes += geometry.chunkLengthBytes(i);
  assert.equal(totalBytes, geometry.deviceSizeBytes);
});

test("pieces() splits a request at chunk borders", () => {
  const geometry = new ChunkGeometry(64 * KiB, 8 * KiB);
  assert.deepEqual(
    [...geometry.pieces(8 * KiB - 10, 8 * KiB + 30)],
    [
      { chunkIndex: 0, inChunkBytes: 8 * KiB - 10, pieceOffsetBytes: 0, lengthBytes: 10 },
      { chunkIndex: 1, inChunkBytes: 0, pieceOffsetBytes: 10, lengthBytes: 8 * KiB },
      { chunkIndex: 2, inChunkBytes: 0, pieceOffsetBytes: 8 * KiB + 10, lengthBytes: 20 },
    ],
  );
  assert.deepEqual(
    [...geometry.pieces(16 * KiB + 1, 5)],
    [{ chunkIndex: 2, inChunkBytes: 1, pieceOffsetBytes: 0, lengthBytes: 5 }],
  );
  assert.deepEqual(
    [...geometry.pieces(0, 16 * KiB)],
    [
      { chunkIndex: 0, inChunkBytes: 0, pieceOffsetBytes: 0, lengthBytes: 8 * KiB },
      { chunkIndex: 1, inChunkBytes: 0, pieceOffsetBytes: 8 * KiB, lengthBytes: 8 * KiB },
    ],
  );
  assert.throws(() => [...geometry.pieces(60 * KiB, 8 * KiB)], AssertionError);
  assert.throws(() => [...geometry.pieces(0, 0)], AssertionError);
});

test("pieces() tile every request exactly, up to a short last chunk", () => {
  const chunkSizeBytes = 4096;
  const geometry = new ChunkGeometry(5 * chunkSizeBytes + 1234, chunkSizeBytes);
  const sizeBytes = geometry.deviceSizeBytes;
  for (const offsetBytes of [0, 1, 4095, 4096, 8191, 20000, 20480, sizeBytes - 1]) {
    for (const lengthBytes of [1, 2, 4095, 4096, 4097, 12288, sizeBytes]) {
      if (offsetBytes + lengthBytes > sizeBytes) continue;
      const pieces: ChunkPiece[] = [...geometry.pieces(offsetBytes, lengthBytes)];
      let expectedPieceOffset = 0;
      for (const piece of pieces) {
        assert.equal(piece.pieceOffsetBytes, expectedPieceOffset);
        const absoluteBytes = offsetBytes + piece.pieceOffsetBytes;
        assert.equal(piece.chunkIndex, Math.floor(absoluteBytes / chunkSizeBytes));
        assert.equal(piece.inChunkBytes, absoluteBytes % chunkSizeBytes);
        assert.ok(piece.lengthBytes > 0);
        // A piece never leaves its chunk, and never passes the short last chunk's end.
        assert.ok(piece.inChunkBytes + piece.lengthBytes <= geometry.chunkLengthBytes(piece.chunkIndex));
        expectedPieceOffset += piece.lengthBytes;
      }
      assert.equal(expectedPieceOffset, lengthBytes, `${offsetBytes}+${lengthBytes}`);
      const firstChunk = Math.floor(offsetBytes / chunkSizeBytes);
      const lastChunk = Math.floor((offsetBytes + lengthBytes - 1) / chunkSizeBytes);
      assert.equal(pieces.length, lastChunk - firstChunk + 1);
    }
  }
});

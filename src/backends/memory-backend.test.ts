import assert from "node:assert/strict";
import { test } from "node:test";
import { MemoryBackend, memoryPageSizeBytes } from "./memory-backend.js";

test("MemoryBackend reads back writes that straddle pages and reads zeroes elsewhere", async () => {
  const backend = new MemoryBackend(4 * memoryPageSizeBytes + 100);
  const source = new Uint8Array(memoryPageSizeBytes + 10).map((_, i) => (i % 251) + 1);
  await backend.write(memoryPageSizeBytes - 5, source);
  const target = new Uint8Array(source.length + 10);
  await backend.read(memoryPageSizeBytes - 10, target);
  assert.deepEqual(target.subarray(0, 5), new Uint8Array(5));
  assert.deepEqual(target.subarray(5, 5 + source.length), source);
  assert.deepEqual(target.subarray(5 + source.length), new Uint8Array(5));
  const tail = new Uint8Array(100);
  await backend.read(4 * memoryPageSizeBytes, tail);
  assert.deepEqual(tail, new Uint8Array(100));
});

test("MemoryBackend extents report holes, and trim of whole pages frees them", async () => {
  const backend = new MemoryBackend(4 * memoryPageSizeBytes);
  await backend.write(memoryPageSizeBytes, new Uint8Array([1]));
  assert.deepEqual(await backend.extents(0, 4 * memoryPageSizeBytes), [
    { lengthBytes: memoryPageSizeBytes, isHole: true, isZero: true },
    { lengthBytes: memoryPageSizeBytes, isHole: false, isZero: false },
    { lengthBytes: 2 * memoryPageSizeBytes, isHole: true, isZero: true },
  ]);
  assert.equal(backend.allocatedBytes, memoryPageSizeBytes);
  await backend.trim(memoryPageSizeBytes, memoryPageSizeBytes);
  assert.equal(backend.allocatedBytes, 0);
  await backend.write(0, new Uint8Array([9, 9, 9]));
  await backend.writeZeroes(1, 1);
  const target = new Uint8Array(3);
  await backend.read(0, target);
  assert.deepEqual([...target], [9, 0, 9]);
});

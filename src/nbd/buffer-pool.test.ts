import assert from "node:assert/strict";
import { test } from "node:test";
import { BufferPool } from "./buffer-pool.js";

test("BufferPool reuses released buffers of the same length", () => {
  const pool = new BufferPool({ pooledBytesMax: 1 << 20, bufferBytesMin: 4096 });
  const first = pool.acquire(65536);
  pool.release(first);
  assert.equal(pool.freeBytes, 65536);
  assert.equal(pool.acquire(65536), first);
  assert.equal(pool.freeBytes, 0);
  assert.notEqual(pool.acquire(65536), first, "a buffer is handed out once");
  const other = pool.acquire(8192);
  assert.equal(other.byteLength, 8192);
});

test("BufferPool keeps at most pooledBytesMax and never pools small buffers", () => {
  const pool = new BufferPool({ pooledBytesMax: 3 * 65536, bufferBytesMin: 4096 });
  const buffers = Array.from({ length: 5 }, () => pool.acquire(65536));
  for (const buffer of buffers) pool.release(buffer);
  assert.equal(pool.freeBytes, 3 * 65536);
  const small = pool.acquire(100);
  pool.release(small);
  assert.equal(pool.freeBytes, 3 * 65536);
  assert.throws(() => pool.release(Buffer.allocUnsafeSlow(8192).subarray(0, 4096)), /whole buffers/);
});

/**
 * The codec pool's hand-over: a caller that gives its buffer away has it moved to the worker (the view is
 * empty afterwards) and gets the same result as with a copy; a view of a shared (pooled) buffer is copied.
 */
import assert from "node:assert/strict";
import { randomBytes } from "node:crypto";
import { test } from "node:test";
import { CodecPool } from "./codec-pool.js";

void test("encode and decode with hand-over move whole buffers and copy shared ones", async () => {
  const pool = new CodecPool(null, 1 << 20, 1);
  try {
    const bytes = randomBytes(256 << 10);
    const copied = await pool.encode(new Uint8Array(bytes));
    const owned = new Uint8Array(bytes);
    const moved = await pool.encode(owned, { handOver: true });
    assert.equal(owned.byteLength, 0, "the owned buffer moved to the worker");
    assert.equal(moved.id, copied.id);
    assert.ok(moved.stored !== null && copied.stored !== null);
    const stored = new Uint8Array(moved.stored);
    const plain = await pool.decode(stored, "chunk", moved.id, { handOver: true });
    assert.equal(stored.byteLength, 0);
    assert.deepEqual(Buffer.from(plain), bytes);
    // A small Buffer is a view into Node's shared pool: it must be copied, never moved.
    const small = Buffer.from("a small chunk of text");
    const shared = await pool.encode(small, { handOver: true });
    assert.equal(small.toString(), "a small chunk of text");
    assert.ok(shared.id.length === 64);
  } finally {
    await pool.close();
  }
});

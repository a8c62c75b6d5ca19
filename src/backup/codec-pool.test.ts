/**
 * The codec pool's hand-over: a caller that gives its buffer away has it moved to the worker (the view is
 * empty afterwards) and gets the same result as with a copy; a view of a shared (pooled) buffer is copied.
 * The slot path (encodeInto/decodeInto on SharedArrayBuffer views) gives the same objects, in place.
 */
import assert from "node:assert/strict";
import { randomBytes } from "node:crypto";
import { test } from "node:test";
import { BlockError } from "../block/errors.js";
import { ChunkSlots } from "./chunk-slots.js";
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

void test("encodeInto/decodeInto work in shared slots: same objects as encode, zero chunks, corruption, keys", async () => {
  const keys = { idKey: randomBytes(32), encryptionKey: randomBytes(32) };
  for (const key of [null, keys]) {
    const pool = new CodecPool(key, 1 << 20, 2);
    try {
      const slots = new ChunkSlots(1 << 20);
      const slot = slots.take();
      const text = Buffer.from("blocksnap shared slot ".repeat(30000)).subarray(0, 1 << 19);
      const bytes = Buffer.concat([text, randomBytes(1 << 19)]);
      slot.plain.set(bytes);
      const { id, storedLength } = await pool.encodeInto(slot.plain, slot.stored);
      assert.ok(storedLength !== null && storedLength < bytes.length, "the text half compresses");
      assert.equal(id, (await pool.encode(bytes)).id, "the same id as encode");
      const stored = Buffer.from(slot.stored.subarray(0, storedLength));
      // The allocating decode reads what encodeInto wrote.
      assert.deepEqual(Buffer.from(await pool.decode(stored, "c", id)), bytes);
      slot.plain.fill(7);
      const plainLength = await pool.decodeInto(slot.stored.subarray(0, storedLength), slot.plain, "c", id);
      assert.equal(plainLength, bytes.length);
      assert.deepEqual(Buffer.from(slot.plain.subarray(0, plainLength)), bytes);
      // A flipped bit is the CRC's EIO; a wrong expected id is named.
      slot.stored.set(stored);
      slot.stored[storedLength - 40] = (slot.stored[storedLength - 40] ?? 0) ^ 1;
      await assert.rejects(
        pool.decodeInto(slot.stored.subarray(0, storedLength), slot.plain, "c", id),
        (error) => error instanceof BlockError && error.errno === "EIO" && /CRC/.test(error.message),
      );
      slot.stored.set(stored);
      await assert.rejects(
        pool.decodeInto(slot.stored.subarray(0, storedLength), slot.plain, "c", "0".repeat(64)),
        (error) => error instanceof BlockError && /does not match its id/.test(error.message),
      );
      // A plain buffer would be copied to the worker and its output lost: refused.
      await assert.rejects(pool.encodeInto(new Uint8Array(16), slot.stored), /SharedArrayBuffer/);
      slot.plain.fill(0);
      const zero = await pool.encodeInto(slot.plain, slot.stored);
      assert.equal(zero.storedLength, null, "an all-zero chunk is stored as nothing");
      assert.equal(zero.id, await pool.zeroId(1 << 20));
      slots.give(slot);
      assert.equal(slots.take(), slot, "a slot given back is reused");
    } finally {
      await pool.close();
    }
  }
});

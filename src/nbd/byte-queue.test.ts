import assert from "node:assert/strict";
import { test } from "node:test";
import { ByteQueue } from "./byte-queue.js";

function filledQueue(...chunks: number[][]): ByteQueue {
  const queue = new ByteQueue();
  for (const chunk of chunks) queue.push(Buffer.from(chunk));
  return queue;
}

test("ByteQueue.peek reads in place within a chunk and through scratch across chunks", () => {
  const queue = filledQueue([1, 2, 3], [4, 5], [6, 7, 8, 9]);
  const inPlace = queue.peek(3);
  assert.deepEqual([...inPlace.subarray(queue.peekOffsetBytes, queue.peekOffsetBytes + 3)], [1, 2, 3]);
  queue.skip(1);
  const across = queue.peek(6);
  assert.deepEqual(
    [...across.subarray(queue.peekOffsetBytes, queue.peekOffsetBytes + 6)],
    [2, 3, 4, 5, 6, 7],
  );
  assert.equal(queue.lengthBytes, 8, "peek does not consume");
});

test("ByteQueue.take returns views within a chunk and copies across chunks, consuming exactly", () => {
  const source = Buffer.from([1, 2, 3, 4]);
  const queue = new ByteQueue();
  queue.push(source);
  queue.push(Buffer.from([5, 6]));
  const view = queue.take(2);
  assert.equal(view.buffer, source.buffer, "a view, not a copy");
  assert.deepEqual([...view], [1, 2]);
  const copy = queue.take(3);
  assert.deepEqual([...copy], [3, 4, 5]);
  assert.equal(queue.lengthBytes, 1);
  assert.deepEqual([...queue.take(1)], [6]);
  assert.equal(queue.lengthBytes, 0);
  assert.throws(() => queue.take(1));
});

test("ByteQueue.takeInto and skip move at most what is queued", () => {
  const queue = filledQueue([1, 2], [3, 4, 5]);
  const target = new Uint8Array(8);
  assert.equal(queue.takeInto(target, 2, 3), 3);
  assert.deepEqual([...target], [0, 0, 1, 2, 3, 0, 0, 0]);
  assert.equal(queue.takeInto(target, 5, 10), 2);
  assert.deepEqual([...target], [0, 0, 1, 2, 3, 4, 5, 0]);
  queue.push(Buffer.from([9, 9, 9]));
  assert.equal(queue.skip(100), 3);
  assert.equal(queue.lengthBytes, 0);
  queue.push(Buffer.from([7]));
  assert.deepEqual([...queue.take(1)], [7]);
});

test("ByteQueue keeps order over many chunks pushed and consumed one byte at a time", () => {
  const queue = new ByteQueue();
  let next = 0;
  for (let index = 0; index < 3000; index += 1) {
    queue.push(Buffer.from([index & 0xff]));
    if (index % 3 === 2) {
      const taken = queue.take(2);
      assert.deepEqual([...taken], [next & 0xff, (next + 1) & 0xff]);
      next += 2;
    }
  }
  assert.equal(queue.lengthBytes, 3000 - next);
});

test("ByteQueue over a reused buffer lends no views, and ownBytes frees the buffer for the next read", () => {
  const receive = Buffer.allocUnsafeSlow(8);
  receive.set([1, 2, 3, 4, 5, 6, 7, 8]);
  const queue = new ByteQueue({ lendsViews: false });
  queue.push(receive.subarray(0, 6));
  const taken = queue.take(2);
  assert.notEqual(taken.buffer, receive.buffer, "a copy, not a view");
  assert.throws(() => queue.takeIfContiguous(2), /lends no views/);
  queue.ownBytes();
  receive.fill(0);
  assert.deepEqual([...taken], [1, 2]);
  assert.equal(queue.lengthBytes, 4);
  assert.deepEqual([...queue.take(4)], [3, 4, 5, 6], "queued bytes survive the buffer's reuse");
});

import { AssertionError } from "node:assert";
import assert from "node:assert/strict";
import { performance } from "node:perf_hooks";
import { test } from "node:test";
import { eventsMax, waitTimeoutMsMax } from "./engine-limits.js";
import type { SnapshotEvent } from "./engine-types.js";
import { EventQueue } from "./event-queue.js";

function noSpace(requestedBytes: number): SnapshotEvent {
  return { type: "no_space", timeMs: 0, requestedBytes };
}

function lowSpace(freeBytes: number): SnapshotEvent {
  return { type: "low_space", timeMs: 0, freeBytes };
}

function corrupted(device: string): SnapshotEvent {
  return { type: "corrupted", timeMs: 0, device, errno: "ENOSPC" };
}

/** Settles within the current turn of the event loop or reports "pending". */
async function peek<T>(promise: Promise<T>): Promise<T | "pending"> {
  return Promise.race([promise, new Promise<"pending">((resolve) => setImmediate(() => resolve("pending")))]);
}

test("EventQueue delivers queued events in FIFO order, at once", async () => {
  const queue = new EventQueue();
  const events = [corrupted("disk0"), lowSpace(5), noSpace(7), corrupted("disk1")];
  for (const event of events) queue.push(event);
  assert.equal(queue.length, 4);
  for (const event of events) assert.equal(await peek(queue.wait(60_000)), event);
  assert.equal(queue.length, 0);
  assert.equal(await queue.wait(0), null);
});

test("EventQueue wait with a timeout resolves null, not before the timeout", async () => {
  const queue = new EventQueue();
  const timeoutMs = 50;
  const startMs = performance.now();
  const result = await queue.wait(timeoutMs);
  const elapsedMs = performance.now() - startMs;
  assert.equal(result, null);
  // Timers may fire a little early relative to performance.now(); allow a few milliseconds.
  assert.ok(elapsedMs >= timeoutMs - 5, `returned after ${elapsedMs} ms`);
  // The timed-out waiter is gone: a later event is queued, not handed to it.
  queue.push(noSpace(1));
  assert.equal(queue.length, 1);
});

test("EventQueue wakes a waiting caller with a pushed event; waiters are served in order", async () => {
  const queue = new EventQueue();
  const first = queue.wait(60_000);
  const second = queue.wait(60_000);
  assert.equal(await peek(first), "pending");
  const a = corrupted("disk0");
  const b = noSpace(1);
  queue.push(a);
  queue.push(b);
  assert.equal(await first, a);
  assert.equal(await second, b);
  // Handed straight to the waiters, never queued.
  assert.equal(queue.length, 0);
});

test("EventQueue is bounded: low_space events are dropped first, then the oldest", async () => {
  const queue = new EventQueue();
  queue.push(corrupted("first"));
  queue.push(lowSpace(1));
  for (let i = 0; i < eventsMax - 3; i++) queue.push(noSpace(i));
  queue.push(lowSpace(2));
  assert.equal(queue.length, eventsMax);
  assert.equal(queue.droppedCount, 0);
  queue.push(corrupted("overflow-1")); // drops lowSpace(1)
  queue.push(corrupted("overflow-2")); // drops lowSpace(2)
  assert.equal(queue.length, eventsMax);
  assert.equal(queue.droppedCount, 2);
  queue.push(corrupted("overflow-3")); // no low_space left: drops the oldest, corrupted("first")
  assert.equal(queue.droppedCount, 3);
  assert.equal(queue.length, eventsMax);
  const drained: SnapshotEvent[] = [];
  for (let event = await queue.wait(0); event; event = await queue.wait(0)) drained.push(event);
  assert.equal(drained.length, eventsMax);
  assert.equal(
    drained.some((event) => event.type === "low_space"),
    false,
  );
  assert.deepEqual(drained[0], noSpace(0));
  assert.deepEqual(drained[eventsMax - 4], noSpace(eventsMax - 4));
  assert.deepEqual(
    drained.slice(-3).map((event) => (event.type === "corrupted" ? event.device : event.type)),
    ["overflow-1", "overflow-2", "overflow-3"],
  );
});

test("EventQueue close releases every waiter with null and ignores later events", async () => {
  const queue = new EventQueue();
  const waiters = [queue.wait(60_000), queue.wait(60_000), queue.wait(waitTimeoutMsMax)];
  assert.equal(await peek(waiters[0]!), "pending");
  queue.close();
  assert.deepEqual(await Promise.all(waiters), [null, null, null]);
  queue.push(corrupted("late"));
  assert.equal(queue.length, 0);
  assert.equal(await peek(queue.wait(60_000)), null);
});

test("EventQueue close still delivers events queued before it", async () => {
  const queue = new EventQueue();
  const event = noSpace(3);
  queue.push(event);
  queue.close();
  assert.equal(await queue.wait(1000), event);
  assert.equal(await peek(queue.wait(1000)), null);
});

test("EventQueue refuses a timeout that is negative, fractional or beyond a day", () => {
  const queue = new EventQueue();
  for (const timeoutMs of [-1, 1.5, Number.NaN, waitTimeoutMsMax + 1]) {
    assert.throws(() => queue.wait(timeoutMs), AssertionError, `${timeoutMs}`);
  }
});

import { AssertionError } from "node:assert";
import assert from "node:assert/strict";
import { performance } from "node:perf_hooks";
import { test } from "node:test";
import { BlockError } from "../block/errors.js";
import { eventsMax, waitTimeoutMsMax } from "./engine-limits.js";
import type { SnapshotEvent } from "./engine-types.js";
import { EventLog, type EventRead } from "./event-log.js";

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

/** Every event after `since`, read with a cursor. */
function readAll(log: EventLog, since = 0): EventRead[] {
  const reads: EventRead[] = [];
  for (let cursor = since; ; ) {
    const read = log.read(cursor);
    if (read.event === null) return reads;
    reads.push(read);
    cursor = read.nextSince;
  }
}

test("EventLog numbers events 1, 2, …; a cursor reads them in order without consuming them", () => {
  const log = new EventLog();
  const events = [corrupted("disk0"), lowSpace(5), noSpace(7), corrupted("disk1")];
  assert.deepEqual(
    events.map((event) => log.push(event)),
    [1, 2, 3, 4],
  );
  assert.equal(log.newestSeq, 4);
  for (const reader of ["first", "second"]) {
    const reads = readAll(log);
    assert.deepEqual(
      reads.map((read) => [read.seq, read.event, read.missed]),
      events.map((event, index) => [index + 1, event, 0]),
      reader,
    );
  }
  assert.equal(log.length, 4);
  // From the middle: a reconnecting reader resumes after its cursor.
  assert.deepEqual(
    readAll(log, 2).map((read) => read.seq),
    [3, 4],
  );
  assert.deepEqual(log.read(4), { event: null, seq: null, nextSince: 4, missed: 0 });
});

test("EventLog cursor-less readers share one cursor: each event once, in order (blksnap's FIFO)", async () => {
  const log = new EventLog();
  const events = [corrupted("disk0"), lowSpace(5), noSpace(7)];
  for (const event of events) log.push(event);
  for (const event of events) {
    const read = await peek(log.wait(null, 60_000));
    assert.ok(read !== "pending", "answered at once");
    assert.equal(read.event, event);
  }
  assert.equal((await log.wait(null, 0)).event, null);
  // The shared cursor does not move anyone else's: a cursor still reads all three.
  assert.equal(readAll(log).length, 3);
});

test("EventLog wait with a timeout resolves without an event, not before the timeout", async () => {
  const log = new EventLog();
  const timeoutMs = 50;
  const startMs = performance.now();
  const read = await log.wait(0, timeoutMs);
  const elapsedMs = performance.now() - startMs;
  assert.deepEqual(read, { event: null, seq: null, nextSince: 0, missed: 0 });
  // Timers may fire a little early relative to performance.now(); allow a few milliseconds.
  assert.ok(elapsedMs >= timeoutMs - 5, `returned after ${elapsedMs} ms`);
  log.push(noSpace(1));
  assert.equal(log.length, 1);
});

test("EventLog wakes every cursor waiter with the same event, and cursor-less waiters one event each", async () => {
  const log = new EventLog();
  const watchers = [log.wait(0, 60_000), log.wait(0, 60_000)];
  const shared = [log.wait(null, 60_000), log.wait(null, 60_000)];
  assert.equal(await peek(watchers[0]!), "pending");
  const a = corrupted("disk0");
  const b = noSpace(1);
  log.push(a);
  for (const watcher of watchers)
    assert.deepEqual(await watcher, { event: a, seq: 1, nextSince: 1, missed: 0 });
  assert.equal((await shared[0]!).event, a);
  assert.equal(await peek(shared[1]!), "pending");
  log.push(b);
  assert.deepEqual(await shared[1]!, { event: b, seq: 2, nextSince: 2, missed: 0 });
});

test("EventLog is bounded: low_space events are dropped first, then the oldest; readers are told what they missed", () => {
  const log = new EventLog();
  log.push(corrupted("first")); // seq 1
  log.push(lowSpace(1)); // seq 2
  for (let i = 0; i < eventsMax - 3; i++) log.push(noSpace(i)); // seq 3 .. eventsMax - 1
  log.push(lowSpace(2)); // seq eventsMax
  assert.equal(log.length, eventsMax);
  assert.equal(log.droppedCount, 0);
  log.push(corrupted("overflow-1")); // drops lowSpace(1), seq 2
  log.push(corrupted("overflow-2")); // drops lowSpace(2), seq eventsMax
  assert.equal(log.length, eventsMax);
  assert.equal(log.droppedCount, 2);
  log.push(corrupted("overflow-3")); // no low_space left: drops the oldest, corrupted("first"), seq 1
  assert.equal(log.droppedCount, 3);
  assert.equal(log.length, eventsMax);

  const reads = readAll(log);
  assert.equal(reads.length, eventsMax);
  assert.equal(
    reads.some((read) => read.event?.type === "low_space"),
    false,
  );
  // Seqs 1 and 2 are gone before noSpace(0) (seq 3); seq eventsMax is gone before overflow-1.
  assert.deepEqual(reads[0], { event: noSpace(0), seq: 3, nextSince: 3, missed: 2 });
  assert.deepEqual(
    reads.filter((read) => read.missed > 0).map((read) => [read.seq, read.missed]),
    [
      [3, 2],
      [eventsMax + 1, 1],
    ],
  );
  assert.deepEqual(
    reads.slice(-3).map((read) => (read.event?.type === "corrupted" ? read.event.device : read.event?.type)),
    ["overflow-1", "overflow-2", "overflow-3"],
  );
  // Read-only: a second pass sees the same.
  assert.deepEqual(readAll(log), reads);
});

test("EventLog refuses a cursor beyond the newest event or not a whole number (EINVAL)", () => {
  const log = new EventLog();
  log.push(noSpace(1));
  for (const since of [2, -1, 1.5]) {
    assert.throws(
      () => log.read(since),
      (error: unknown) => error instanceof BlockError && error.errno === "EINVAL",
      `${since}`,
    );
  }
});

test("EventLog close wakes every waiter without an event; kept events stay readable, later ones are ignored", async () => {
  const log = new EventLog();
  log.push(noSpace(3));
  const waiters = [log.wait(1, 60_000), log.wait(1, waitTimeoutMsMax)];
  assert.equal(await peek(waiters[0]!), "pending");
  log.close();
  assert.deepEqual(
    (await Promise.all(waiters)).map((read) => read.event),
    [null, null],
  );
  assert.equal(log.push(corrupted("late")), 0);
  assert.equal(log.length, 1);
  assert.equal((await peek(log.wait(0, 60_000))) !== "pending", true);
  assert.deepEqual((await log.wait(0, 1000)).event, noSpace(3));
  assert.equal((await peek(log.wait(1, 60_000))) === "pending", false);
});

test("EventLog refuses a timeout that is negative, fractional or beyond a day", () => {
  const log = new EventLog();
  for (const timeoutMs of [-1, 1.5, Number.NaN, waitTimeoutMsMax + 1]) {
    assert.throws(() => log.wait(0, timeoutMs), AssertionError, `${timeoutMs}`);
  }
});

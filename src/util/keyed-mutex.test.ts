import { AssertionError } from "node:assert";
import assert from "node:assert/strict";
import { test } from "node:test";
import { KeyedMutex } from "./keyed-mutex.js";

/** Lets every pending promise callback and one macrotask run. */
function settle(): Promise<void> {
  return new Promise((resolve) => setImmediate(resolve));
}

test("KeyedMutex excludes holders of one key and serves waiters in arrival order", async () => {
  const mutex = new KeyedMutex();
  const order: string[] = [];
  let holders = 0;
  let maxHolders = 0;
  const worker = async (label: string): Promise<void> => {
    const release = await mutex.lock(7);
    holders++;
    maxHolders = Math.max(maxHolders, holders);
    order.push(`start ${label}`);
    // Give every other worker a chance to run while this one holds the lock.
    await settle();
    await settle();
    order.push(`end ${label}`);
    holders--;
    release();
  };
  await Promise.all(["a", "b", "c", "d"].map(worker));
  assert.equal(maxHolders, 1);
  assert.deepEqual(order, ["start a", "end a", "start b", "end b", "start c", "end c", "start d", "end d"]);
  assert.equal(mutex.lockedCount, 0);
  assert.equal(mutex.isLocked(7), false);
});

test("KeyedMutex: a waiter gets the lock only after release", async () => {
  const mutex = new KeyedMutex();
  const releaseFirst = await mutex.lock(1);
  let acquired = false;
  const second = mutex.lock(1).then((release) => {
    acquired = true;
    return release;
  });
  await settle();
  assert.equal(acquired, false);
  assert.equal(mutex.isLocked(1), true);
  releaseFirst();
  const releaseSecond = await second;
  assert.equal(acquired, true);
  assert.equal(mutex.isLocked(1), true);
  releaseSecond();
  assert.equal(mutex.isLocked(1), false);
});

test("KeyedMutex: different keys do not block each other", async () => {
  const mutex = new KeyedMutex();
  const releaseA = await mutex.lock(0);
  let gotB = false;
  const b = mutex.lock(1).then((release) => {
    gotB = true;
    return release;
  });
  await settle();
  assert.equal(gotB, true);
  assert.equal(mutex.lockedCount, 2);
  (await b)();
  assert.equal(mutex.lockedCount, 1);
  releaseA();
  assert.equal(mutex.lockedCount, 0);
});

test("KeyedMutex keeps no entry for free keys, however many were used", async () => {
  const mutex = new KeyedMutex();
  const releases = await Promise.all(Array.from({ length: 1000 }, (_, key) => mutex.lock(key * 4096)));
  assert.equal(mutex.lockedCount, 1000);
  // Queue a waiter on some keys so release hands over instead of freeing.
  const waiters = [mutex.lock(0), mutex.lock(4096)];
  for (const release of releases) release();
  assert.equal(mutex.lockedCount, 2);
  for (const release of await Promise.all(waiters)) release();
  assert.equal(mutex.lockedCount, 0);
});

test("KeyedMutex asserts on a double release", async () => {
  const mutex = new KeyedMutex();
  const release = await mutex.lock(3);
  const next = mutex.lock(3);
  release();
  // The second release of the same handle must not free the lock now held by the waiter.
  assert.throws(() => release(), AssertionError);
  assert.equal(mutex.isLocked(3), true);
  (await next)();
  assert.equal(mutex.isLocked(3), false);
  assert.throws(() => release(), AssertionError);
});

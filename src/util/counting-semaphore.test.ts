import assert from "node:assert/strict";
import { test } from "node:test";
import { CountingSemaphore } from "./counting-semaphore.js";

test("CountingSemaphore: at most `slots` tasks at once, FIFO, slots come back on failure, idle() waits", async () => {
  const semaphore = new CountingSemaphore(2);
  let running = 0;
  let runningMax = 0;
  const order: number[] = [];
  const releases: Array<() => void> = [];
  const tasks = [0, 1, 2, 3, 4].map((index) =>
    semaphore.run(async () => {
      running++;
      runningMax = Math.max(runningMax, running);
      order.push(index);
      await new Promise<void>((resolve) => releases.push(resolve));
      running--;
      if (index === 1) throw new Error("task 1 fails");
      return index;
    }),
  );
  const settled = Promise.allSettled(tasks);
  await new Promise((resolve) => setImmediate(resolve));
  assert.equal(semaphore.heldCount, 2);
  assert.equal(semaphore.waitingCount, 3);
  let idle = false;
  const idlePromise = semaphore.idle().then(() => {
    idle = true;
  });
  for (let step = 0; step < 5; step++) {
    await new Promise((resolve) => setImmediate(resolve));
    releases.shift()?.();
  }
  const results = await settled;
  await idlePromise;
  assert.equal(idle, true);
  assert.equal(runningMax, 2);
  assert.deepEqual(order, [0, 1, 2, 3, 4]);
  assert.equal(results[1]?.status, "rejected");
  assert.deepEqual(
    results.filter((result) => result.status === "fulfilled").map((result) => result.value),
    [0, 2, 3, 4],
  );
  assert.equal(semaphore.heldCount, 0);
  assert.throws(() => new CountingSemaphore(0));
});

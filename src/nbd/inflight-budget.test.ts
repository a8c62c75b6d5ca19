import assert from "node:assert/strict";
import { test } from "node:test";
import { InflightBudget } from "./inflight-budget.js";

const settle = () => new Promise<void>((resolve) => setImmediate(resolve));

test("InflightBudget grants what fits and queues the rest until bytes come back", async () => {
  const budget = new InflightBudget({ bytesMax: 100, clientBytesMax: 60 });
  const granted: string[] = [];
  assert.equal(budget.request("a", 60, () => granted.push("a1")).isGranted, true);
  assert.equal(budget.request("b", 40, () => granted.push("b1")).isGranted, true);
  const waiting = budget.request("b", 10, () => granted.push("b2"));
  assert.equal(waiting.isGranted, false, "the global bound is reached");
  assert.equal(budget.inUseBytes, 100);
  budget.release("a", 60);
  await settle();
  assert.deepEqual(granted, ["b2"], "only a waiter is told, in a later microtask");
  assert.equal(waiting.isGranted, true);
  assert.equal(budget.inUseBytes, 50);
});

test("InflightBudget: a waiter over its client's share does not hold up other clients", async () => {
  const budget = new InflightBudget({ bytesMax: 100, clientBytesMax: 50 });
  budget.request("a", 50, () => {});
  const overShare = budget.request("a", 10, () => {});
  assert.equal(overShare.isGranted, false, "client a has its share");
  const other = budget.request("b", 30, () => {});
  assert.equal(other.isGranted, true, "b is not behind a's own limit");
  budget.release("a", 50);
  await settle();
  assert.equal(overShare.isGranted, true);
});

test("InflightBudget: a large waiter is not starved by later small requests; cancel returns bytes", async () => {
  const budget = new InflightBudget({ bytesMax: 100, clientBytesMax: 100 });
  budget.request("a", 90, () => {});
  const large = budget.request("b", 80, () => {});
  const small = budget.request("c", 5, () => {});
  assert.equal(large.isGranted, false);
  assert.equal(small.isGranted, false, "the small one waits behind the large one");
  budget.cancel(large);
  await settle();
  assert.equal(small.isGranted, true);
  budget.cancel(small);
  assert.equal(budget.inUseBytes, 90);
  assert.equal(budget.waiterCount, 0);
});

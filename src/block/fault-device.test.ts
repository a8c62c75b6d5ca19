import assert from "node:assert/strict";
import { test } from "node:test";
import { MemoryBackend } from "../backends/memory-backend.js";
import { BlockError } from "./errors.js";
import { FaultDevice } from "./fault-device.js";
import { PassThroughDevice } from "./pass-through-device.js";

const KiB = 1024;
const isErrno = (errno: string) => (error: unknown) => error instanceof BlockError && error.errno === errno;

test("PassThroughDevice forwards every operation unchanged", async () => {
  const inner = new MemoryBackend(64 * KiB);
  const stage = new PassThroughDevice(inner);
  assert.equal(stage.sizeBytes, inner.sizeBytes);
  assert.equal(stage.capabilities, inner.capabilities);
  await stage.write(4096, new Uint8Array(512).fill(7));
  const back = new Uint8Array(512);
  await inner.read(4096, back);
  assert.ok(back.every((byte) => byte === 7));
  await stage.writeZeroes(4096, 256);
  await stage.read(4096, back);
  assert.equal(back[0], 0);
  assert.equal(back[256], 7);
  await stage.flush();
});

test("FaultDevice fails the chosen operation in the chosen range, after skipCount, at most count times", async () => {
  const inner = new MemoryBackend(64 * KiB);
  const device = new FaultDevice(inner, {
    rules: [
      {
        operations: ["write"],
        errno: "ENOSPC",
        offsetBytes: 8 * KiB,
        lengthBytes: 4 * KiB,
        skipCount: 1,
        count: 2,
      },
    ],
  });
  const data = new Uint8Array(KiB).fill(9);
  await device.write(0, data); // outside the range
  await device.write(8 * KiB, data); // skipped once
  await assert.rejects(device.write(9 * KiB, data), isErrno("ENOSPC"));
  await assert.rejects(device.write(11 * KiB, data), isErrno("ENOSPC"));
  await device.write(10 * KiB, data); // count exhausted
  await device.read(8 * KiB, new Uint8Array(KiB)); // reads are not in the rule
  assert.equal(device.firedCounts.get("write"), 2);
  const check = new Uint8Array(KiB);
  await inner.read(9 * KiB, check);
  assert.ok(
    check.every((byte) => byte === 0),
    "a failed write changed nothing below",
  );
  assert.equal(device.directReadFd(), null);
});

test("FaultDevice: torn writes leave a prefix, the second write fails too, flush and EIO on reads", async () => {
  const inner = new MemoryBackend(64 * KiB);
  const device = new FaultDevice(inner, {
    rules: [
      { operations: ["write"], errno: "EIO", tornFraction: 0.5, count: 2 },
      { operations: ["read", "flush"], errno: "EIO" },
    ],
  });
  await assert.rejects(device.write(0, new Uint8Array(4 * KiB).fill(3)), isErrno("EIO"));
  const check = new Uint8Array(4 * KiB);
  await inner.read(0, check);
  assert.equal(check[2 * KiB - 1], 3);
  assert.equal(check[2 * KiB], 0);
  await assert.rejects(device.write(8 * KiB, new Uint8Array(KiB).fill(4)), isErrno("EIO"));
  await device.write(8 * KiB, new Uint8Array(KiB).fill(4));
  await assert.rejects(device.read(0, check), isErrno("EIO"));
  await assert.rejects(device.flush(), isErrno("EIO"));
  device.enabled = false;
  await device.read(8 * KiB, check.subarray(0, KiB));
  assert.equal(check[0], 4);
});

test("FaultDevice: a probability replays exactly from its seed", async () => {
  const outcomes = async (seed: number) => {
    const device = new FaultDevice(new MemoryBackend(64 * KiB), {
      rules: [{ operations: ["read"], errno: "EIO", probability: 0.3 }],
      seed,
    });
    const results: boolean[] = [];
    for (let index = 0; index < 64; index++) {
      results.push(
        await device.read(0, new Uint8Array(512)).then(
          () => true,
          () => false,
        ),
      );
    }
    return results;
  };
  const first = await outcomes(42);
  assert.deepEqual(await outcomes(42), first);
  const failures = first.filter((ok) => !ok).length;
  assert.ok(failures > 5 && failures < 40, `about 30% of 64 reads fail: ${failures}`);
  assert.throws(
    () =>
      new FaultDevice(new MemoryBackend(KiB), {
        rules: [{ operations: ["read"], errno: "EIO", probability: 2 }],
      }),
    isErrno("EINVAL"),
  );
});

test("FaultDevice: a delay-only rule slows the call down and lets it succeed", async () => {
  const inner = new MemoryBackend(64 * KiB);
  const device = new FaultDevice(inner, { rules: [{ operations: ["write"], delayMs: 5, count: 1 }] });
  let settled = false;
  const write = device.write(0, new Uint8Array(512).fill(1)).then(() => {
    settled = true;
  });
  await Promise.resolve();
  assert.equal(settled, false, "the write waits for its delay");
  await write;
  const check = new Uint8Array(512);
  await inner.read(0, check);
  assert.equal(check[0], 1);
  assert.equal(device.firedCounts.get("write"), 1);
  assert.throws(() => new FaultDevice(inner, { rules: [{ operations: ["read"] }] }), isErrno("EINVAL"));
});

/**
 * Writes by reference (fs-writer.ts, fs-write-protocol.ts): payloads in SharedArrayBuffers go to the
 * writer thread without a staging copy. Seeded random rounds of concurrent writes — views at random
 * offsets of a few shared buffers (several per buffer and batch), plain buffers, zeroes — overlapping
 * on purpose (they must land in issue order), checked against a model; the shared buffers are rewritten
 * as soon as each round settled, which must not change what was written. Then the registration bound:
 * more shared memory than sharedBytesMax still writes correctly (staged beyond the bound).
 * Streamed completions: seeded random bursts of writes, some of them doomed (a read-only descriptor), in
 * batches of every size (past notifyEveryOps and opsPerBatchMax, across all slots): every write settles
 * once, with its own outcome, in issue order, and the file matches a model.
 * Lost wake-ups: a thread that pauses between publishing a count and notifying, under a queue of small
 * writes whose completions the event loop takes while the thread runs on; every write must settle.
 * Replay with BLOCKSNAP_SEED=<seed>.
 */
import assert from "node:assert/strict";
import { closeSync, mkdtempSync, openSync, readFileSync, rmSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { after, test } from "node:test";
import { FileBackend } from "./file-backend.js";
import { notifyEveryOps, opsPerBatchMax, slotCount } from "./fs-write-protocol.js";
import { FileSystemWriter, sharedBytesMax } from "./fs-writer.js";

const directory = mkdtempSync(join(tmpdir(), "blocksnap-fs-writer-"));
after(() => rmSync(directory, { recursive: true, force: true }));

/** mulberry32, seeded from BLOCKSNAP_SEED or at random (the seed is printed). */
function seededRandom(): { seed: number; int: (min: number, max: number) => number } {
  const fromEnv = process.env.BLOCKSNAP_SEED;
  const seed = fromEnv ? Number.parseInt(fromEnv, 10) >>> 0 : Math.floor(Math.random() * 2 ** 32);
  let state = seed;
  const next = () => {
    state = (state + 0x6d2b79f5) >>> 0;
    let t = state;
    t = Math.imul(t ^ (t >>> 15), t | 1);
    t ^= t + Math.imul(t ^ (t >>> 7), t | 61);
    return ((t ^ (t >>> 14)) >>> 0) / 2 ** 32;
  };
  return { seed, int: (min, max) => min + Math.floor(next() * (max - min + 1)) };
}

test("writes from shared buffers, staged writes and zeroes interleave in issue order and match a model", async (t) => {
  const random = seededRandom();
  t.diagnostic(`seed ${random.seed} (replay with BLOCKSNAP_SEED=${random.seed})`);
  const sizeBytes = 2 << 20;
  const backend = FileBackend.open(join(directory, "model.img"), { sizeBytes });
  const model = new Uint8Array(sizeBytes);
  const shared = Array.from(
    { length: 3 },
    (_, index) => new Uint8Array(new SharedArrayBuffer((index + 1) << 18)),
  );
  let sharedWrites = 0;
  try {
    for (let round = 0; round < 60; round++) {
      // Within a round each op's view is a region of its own (a payload may not change until its write
      // settled), filled just before it is written; several views share a buffer and a batch.
      const cursors = shared.map(() => 0);
      const operations: Promise<void>[] = [];
      const opCount = random.int(1, 40);
      for (let k = 0; k < opCount; k++) {
        const lengthBytes = random.int(1, 300 * 1024);
        const offsetBytes = random.int(0, sizeBytes - lengthBytes);
        const kind = random.int(0, 9);
        const which = random.int(0, shared.length - 1);
        const buffer = shared[which]!;
        const start = cursors[which]! + random.int(0, 3) * 512;
        if (kind < 6 && start + lengthBytes <= buffer.byteLength) {
          cursors[which] = start + lengthBytes;
          const view = buffer.subarray(start, start + lengthBytes);
          for (let i = 0; i < view.byteLength; i += 509) view[i] = random.int(0, 255);
          view.fill(random.int(0, 255), 0, random.int(0, lengthBytes));
          operations.push(backend.write(offsetBytes, view));
          model.set(view, offsetBytes);
          sharedWrites++;
        } else if (kind < 9) {
          const plain = new Uint8Array(lengthBytes).fill(random.int(0, 255));
          operations.push(backend.write(offsetBytes, plain));
          model.set(plain, offsetBytes);
        } else {
          operations.push(backend.writeZeroes(offsetBytes, lengthBytes));
          model.fill(0, offsetBytes, offsetBytes + lengthBytes);
        }
        // Now and then a new turn of the event loop, so a round spans several batches.
        if (random.int(0, 7) === 0) await new Promise((resolve) => setImmediate(resolve));
      }
      await Promise.all(operations);
      // Rewriting the shared buffers now must not change what the file holds.
      for (const buffer of shared) buffer.fill(round & 0xff);
      if (round % 10 === 9 || round === 59) {
        const actual = new Uint8Array(sizeBytes);
        await backend.read(0, actual);
        const differs = actual.findIndex((byte, index) => byte !== model[index]);
        assert.equal(differs, -1, `round ${round}: byte ${differs} differs (seed ${random.seed})`);
      }
    }
  } finally {
    await backend.close();
  }
  assert.ok(sharedWrites > 100, `${sharedWrites} writes from shared buffers`);
});

test("more shared memory than the registration bound still writes correctly", async () => {
  const backend = FileBackend.open(join(directory, "bound.img"), { sizeBytes: 1 << 20 });
  try {
    // Shared buffers whose total passes sharedBytesMax: untouched pages cost no memory.
    const bufferBytes = 64 << 20;
    const buffers = Array.from(
      { length: Math.ceil(sharedBytesMax / bufferBytes) + 2 },
      () => new Uint8Array(new SharedArrayBuffer(bufferBytes)),
    );
    const writes = buffers.map((buffer, index) => {
      const view = buffer.subarray(bufferBytes - 8192, bufferBytes - 4096).fill(index + 1);
      return backend.write(index * 4096, view);
    });
    await Promise.all(writes);
    for (const buffer of buffers) buffer.fill(0xee, bufferBytes - 8192, bufferBytes - 4096);
    const actual = new Uint8Array(buffers.length * 4096);
    await backend.read(0, actual);
    for (let index = 0; index < buffers.length; index++) {
      const page = actual.subarray(index * 4096, (index + 1) * 4096);
      assert.ok(
        page.every((byte) => byte === index + 1),
        `buffer ${index}'s page was written`,
      );
    }
  } finally {
    await backend.close();
  }
});

test("streamed completions: every write settles once, with its own outcome, in issue order", async (t) => {
  const random = seededRandom();
  t.diagnostic(`seed ${random.seed} (replay with BLOCKSNAP_SEED=${random.seed})`);
  const path = join(directory, "stream.img");
  const sizeBytes = 1 << 20;
  const blockBytes = 512;
  const writable = openSync(path, "w+");
  // Writes through this descriptor fail (EBADF) in the thread, between writes that succeed.
  const readOnly = openSync(path, "r");
  const writer = FileSystemWriter.acquire(`test:stream:${random.seed}`);
  const model = new Uint8Array(sizeBytes);
  let doomedWrites = 0;
  let largestBurst = 0;
  try {
    for (let round = 0; round < 40; round++) {
      const burst = round % 4 === 0 ? random.int(opsPerBatchMax + 1, 2 * opsPerBatchMax) : random.int(1, 60);
      largestBurst = Math.max(largestBurst, burst);
      const settledOrder: number[] = [];
      const outcomes: Array<Promise<void>> = [];
      const doomed = new Set<number>();
      for (let index = 0; index < burst; index++) {
        const blockIndex = random.int(0, sizeBytes / blockBytes - 1);
        const payload = new Uint8Array(blockBytes).fill(random.int(0, 255));
        const isDoomed = random.int(0, 9) === 0;
        if (isDoomed) doomed.add(index);
        else model.set(payload, blockIndex * blockBytes);
        const fd = isDoomed ? readOnly : writable;
        const settled = writer.write(fd, blockIndex * blockBytes, payload);
        outcomes.push(settled);
        settled.then(
          () => settledOrder.push(index),
          () => settledOrder.push(index),
        );
        // Now and then a new turn of the event loop: the burst spans batches and slots.
        if (random.int(0, 15) === 0) await new Promise((resolve) => setImmediate(resolve));
      }
      const results = await Promise.allSettled(outcomes);
      results.forEach((result, index) => {
        if (doomed.has(index)) {
          assert.equal(result.status, "rejected", `write ${index} of round ${round} failed`);
          const error = (result as PromiseRejectedResult).reason as NodeJS.ErrnoException;
          assert.equal(error.code, "EBADF", `write ${index} of round ${round}: ${error.message}`);
        } else {
          assert.equal(result.status, "fulfilled", `write ${index} of round ${round} succeeded`);
        }
      });
      doomedWrites += doomed.size;
      // allSettled's own reactions ran after every write's: all are recorded, once each, in issue order.
      assert.deepEqual(
        settledOrder,
        Array.from({ length: burst }, (_, index) => index),
        `round ${round}: settled in issue order (seed ${random.seed})`,
      );
    }
    const actual = new Uint8Array(readFileSync(path)).subarray(0, sizeBytes);
    const padded = new Uint8Array(sizeBytes);
    padded.set(actual);
    const differs = padded.findIndex((byte, index) => byte !== model[index]);
    assert.equal(differs, -1, `byte ${differs} differs (seed ${random.seed})`);
  } finally {
    writer.release();
    closeSync(writable);
    closeSync(readOnly);
  }
  assert.ok(doomedWrites > 0, "some writes failed on purpose");
  assert.ok(largestBurst > opsPerBatchMax && opsPerBatchMax > notifyEveryOps && slotCount > 1);
});

test("no completion is left waiting: a thread slow to notify still wakes the event loop for every write", async (t) => {
  const random = seededRandom();
  t.diagnostic(`seed ${random.seed} (replay with BLOCKSNAP_SEED=${random.seed})`);
  const fd = openSync(join(directory, "wake.img"), "w+");
  // The pause widens the window between the thread's published count and its notify, where the event
  // loop, woken by the previous notify, takes that count and starts a new wait: with the old armed-flag
  // protocol this test hung in 2 of 2 runs (every write after the lost wake-up waited forever).
  const writer = FileSystemWriter.acquire(`test:wake:${random.seed}`, { pauseBeforeNotifyMicros: 40 });
  const writeCount = 6000;
  const queueDepth = 16;
  const payload = new Uint8Array(4096).fill(7);
  let issued = 0;
  let settled = 0;
  const lane = async () => {
    while (issued < writeCount) {
      issued++;
      await writer.write(fd, random.int(0, 1023) * 4096, payload);
      settled++;
      // Busy turns of the event loop between completions, of random length.
      const spinUntil = process.hrtime.bigint() + BigInt(random.int(0, 20) * 1000);
      while (process.hrtime.bigint() < spinUntil);
    }
  };
  let watchdog: NodeJS.Timeout | undefined;
  // A liveness check, not a timing one: a write that has not settled after 5 s on an idle thread never will.
  const stalled = new Promise<never>((_, reject) => {
    let settledBefore = -1;
    watchdog = setInterval(() => {
      if (settled !== settledBefore) {
        settledBefore = settled;
        return;
      }
      // The hung batches keep the thread referenced: end it, or this test file would never exit.
      const internals = writer as unknown as { thread: { worker: { terminate(): Promise<number> } } | null };
      void internals.thread?.worker.terminate();
      reject(new Error(`no write settled for 5 s after ${settled} (seed ${random.seed})`));
    }, 5000);
  });
  try {
    await Promise.race([Promise.all(Array.from({ length: queueDepth }, lane)), stalled]);
    assert.equal(settled, writeCount);
  } finally {
    clearInterval(watchdog);
    writer.release();
    closeSync(fd);
  }
});

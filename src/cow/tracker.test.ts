import { AssertionError } from "node:assert";
import assert from "node:assert/strict";
import { test } from "node:test";
import { MemoryBackend } from "../backends/memory-backend.js";
import type { BlockDevice } from "../block/device.js";
import { BlockError, type Errno } from "../block/errors.js";
import { CbtMap } from "../cbt/cbt-map.js";
import { DiffStorage } from "../storage/diff-storage.js";
import { DiffArea } from "./diff-area.js";
import { Tracker } from "./tracker.js";

const KiB = 1024;
const MiB = 1024 * KiB;
const cbtBlockBytes = 64 * KiB;

function pattern(lengthBytes: number, seed: number): Uint8Array {
  return new Uint8Array(lengthBytes).map((_, i) => (i * 5 + seed * 11 + 1) & 0xff);
}

/** Lets pending callbacks and `count` macrotasks run. */
async function settle(count = 4): Promise<void> {
  for (let i = 0; i < count; i++) await new Promise((resolve) => setImmediate(resolve));
}

/** Tracks whether a promise has settled, without awaiting it. */
function track<T>(promise: Promise<T>): { readonly done: () => boolean; readonly promise: Promise<T> } {
  let done = false;
  const tracked = promise.finally(() => {
    done = true;
  });
  return { done: () => done, promise: tracked };
}

function nonZeroBlocks(map: Uint8Array): number[] {
  const found: number[] = [];
  map.forEach((value, index) => {
    if (value !== 0) found.push(index);
  });
  return found;
}

function newTracker(sizeBytes = 4 * MiB): { tracker: Tracker; backend: MemoryBackend } {
  const backend = new MemoryBackend(sizeBytes, { yieldCount: () => 1 });
  const tracker = new Tracker("disk0", backend, new CbtMap(sizeBytes));
  return { tracker, backend };
}

test("hold() resolves only after the writes in flight have finished", async () => {
  const { tracker, backend } = newTracker();
  const order: string[] = [];
  const write = tracker.write(0, pattern(4096, 1)).then(() => order.push("write"));
  assert.equal(tracker.inflightWriteCount, 1);
  const zero = tracker.writeZeroes(MiB, 4096).then(() => order.push("zeroes"));
  const trim = tracker.trim(2 * MiB, 4096).then(() => order.push("trim"));
  assert.equal(tracker.inflightWriteCount, 3);
  const hold = tracker.hold().then(() => order.push("hold"));
  assert.equal(tracker.isHeld, true);
  await Promise.all([write, zero, trim, hold]);
  assert.equal(order.at(-1), "hold");
  assert.deepEqual(order.slice(0, 3).sort(), ["trim", "write", "zeroes"]);
  assert.equal(tracker.inflightWriteCount, 0);
  const back = new Uint8Array(4096);
  await backend.read(0, back);
  assert.deepEqual(back, pattern(4096, 1));
  tracker.release();
  assert.equal(tracker.isHeld, false);
});

test("hold() with nothing in flight resolves at once", async () => {
  const { tracker } = newTracker();
  const hold = track(tracker.hold());
  await settle(1);
  assert.equal(hold.done(), true);
  tracker.release();
});

test("modifications that arrive during a hold wait for release; reads do not", async () => {
  const { tracker, backend } = newTracker();
  await tracker.write(0, pattern(8192, 1));
  const inflight = tracker.write(4 * cbtBlockBytes, pattern(100, 2));
  const hold = track(tracker.hold());
  // Arrives while the hold is still draining: it must wait too.
  const early = track(tracker.write(0, pattern(8192, 3)));
  await inflight;
  await hold.promise;
  const writeDuring = track(tracker.write(cbtBlockBytes, pattern(4096, 4)));
  const zeroesDuring = track(tracker.writeZeroes(0, 4096));
  const trimDuring = track(tracker.trim(2 * cbtBlockBytes, 4096));
  const read = new Uint8Array(8192);
  await tracker.read(0, read);
  assert.deepEqual(read, pattern(8192, 1));
  await tracker.flush();
  await settle(10);
  assert.equal(early.done(), false);
  assert.equal(writeDuring.done(), false);
  assert.equal(zeroesDuring.done(), false);
  assert.equal(trimDuring.done(), false);
  assert.equal(tracker.inflightWriteCount, 0);
  // Nothing of the held writes reached the backend or the CBT map yet.
  const backendNow = new Uint8Array(8192);
  await backend.read(0, backendNow);
  assert.deepEqual(backendNow, pattern(8192, 1));
  assert.deepEqual(nonZeroBlocks(tracker.cbt.writeMapCopy()), [0, 4]);
  tracker.release();
  await Promise.all([early.promise, writeDuring.promise, zeroesDuring.promise, trimDuring.promise]);
  assert.deepEqual(nonZeroBlocks(tracker.cbt.writeMapCopy()), [0, 1, 2, 4]);
  const atBlock1 = new Uint8Array(4096);
  await backend.read(cbtBlockBytes, atBlock1);
  assert.deepEqual(atBlock1, pattern(4096, 4));
});

test("a second hold waits for release; double hold or release without hold are bugs", async () => {
  const { tracker } = newTracker();
  await tracker.hold();
  await assert.rejects(tracker.hold(), AssertionError);
  tracker.release();
  assert.throws(() => tracker.release(), AssertionError);
  // Writes held by one hold and released, then held again before they ran, still wait.
  await tracker.hold();
  const write = track(tracker.write(0, pattern(10, 1)));
  tracker.release();
  await tracker.hold();
  await settle(10);
  assert.equal(write.done(), false);
  tracker.release();
  await write.promise;
});

test("write, writeZeroes and trim mark the CBT write map; reads and flushes do not", async () => {
  const { tracker } = newTracker();
  await tracker.write(cbtBlockBytes - 1, new Uint8Array(2)); // blocks 0 and 1
  await tracker.writeZeroes(10 * cbtBlockBytes, cbtBlockBytes); // block 10
  await tracker.trim(20 * cbtBlockBytes + 5, 3 * cbtBlockBytes); // blocks 20..23
  await tracker.read(30 * cbtBlockBytes, new Uint8Array(cbtBlockBytes));
  await tracker.flush();
  assert.deepEqual(nonZeroBlocks(tracker.cbt.writeMapCopy()), [0, 1, 10, 20, 21, 22, 23]);
  assert.equal(tracker.cbtErrorCount, 0);
});

test("extents pass through, or report all data when the backend has none", async () => {
  const { tracker } = newTracker(MiB);
  await tracker.write(0, pattern(10, 1));
  const extents = await tracker.extents(0, MiB);
  assert.equal(extents[0]?.isHole, false);
  assert.equal(extents.at(-1)?.isHole, true);
  const backend = new MemoryBackend(MiB);
  const noExtents: BlockDevice = {
    sizeBytes: backend.sizeBytes,
    capabilities: backend.capabilities,
    read: (o, t) => backend.read(o, t),
    write: (o, s) => backend.write(o, s),
    writeZeroes: (o, l) => backend.writeZeroes(o, l),
    trim: (o, l) => backend.trim(o, l),
    flush: () => backend.flush(),
  };
  const plain = new Tracker("plain", noExtents, new CbtMap(MiB));
  assert.deepEqual(await plain.extents(4096, 8192), [{ lengthBytes: 8192, isHole: false, isZero: false }]);
});

test("a failed backend write still marks CBT and does not leave the tracker in flight", async () => {
  const backend = new MemoryBackend(MiB);
  const failing: BlockDevice = {
    sizeBytes: backend.sizeBytes,
    capabilities: backend.capabilities,
    read: (o, t) => backend.read(o, t),
    write: async () => {
      throw new BlockError("EIO", "injected");
    },
    writeZeroes: (o, l) => backend.writeZeroes(o, l),
    trim: (o, l) => backend.trim(o, l),
    flush: () => backend.flush(),
  };
  const tracker = new Tracker("failing", failing, new CbtMap(MiB));
  await assert.rejects(
    tracker.write(3 * cbtBlockBytes, new Uint8Array(1)),
    (error: unknown) => error instanceof BlockError && error.errno === "EIO",
  );
  assert.deepEqual(nonZeroBlocks(tracker.cbt.writeMapCopy()), [3]);
  assert.equal(tracker.inflightWriteCount, 0);
  const hold = track(tracker.hold());
  await settle(1);
  assert.equal(hold.done(), true);
  tracker.release();
});

test("a CBT failure skips neither the write nor copy-before-write", async () => {
  const sizeBytes = 2 * MiB;
  const backend = new MemoryBackend(sizeBytes, { yieldCount: () => 1 });
  // A map made for half the device (as after a resize): marks in the upper half fail.
  const tracker = new Tracker("disk0", backend, new CbtMap(sizeBytes / 2));
  const before = pattern(sizeBytes, 1);
  await backend.write(0, before);
  const storage = new DiffStorage({ path: "memory:", limitBytes: 16 * MiB, growthPortionBytes: MiB });
  const corruptions: Errno[] = [];
  const diffArea = new DiffArea({
    deviceName: "disk0",
    origin: backend,
    sizeBytes,
    chunkSizeBytes: 64 * KiB,
    storage,
    onCowError: "break-snapshot",
    onCorrupted: (errno) => corruptions.push(errno),
  });
  await tracker.hold();
  tracker.setDiffArea(diffArea);
  tracker.release();
  assert.equal(tracker.attachedDiffArea, diffArea);

  const offsetBytes = sizeBytes / 2 + 64 * KiB + 100; // in chunk 17, past the CBT map
  const after = pattern(5000, 9);
  await tracker.write(offsetBytes, after);
  assert.equal(tracker.cbtErrorCount, 1);
  assert.equal(tracker.cbt.isCorrupted, true);
  // The origin write happened...
  const origin = new Uint8Array(5000);
  await backend.read(offsetBytes, origin);
  assert.deepEqual(origin, after);
  // ...after its chunk was preserved: the image still shows the bytes of take.
  assert.equal(diffArea.isChunkStored(17), true);
  const image = new Uint8Array(5000);
  await diffArea.readImage(offsetBytes, image);
  assert.deepEqual(image, before.subarray(offsetBytes, offsetBytes + 5000));
  // Later writes, even inside the map's range, keep preserving (the map stays corrupted until a take).
  await tracker.writeZeroes(0, 4096);
  await tracker.trim(3 * 64 * KiB, 10);
  assert.equal(tracker.cbtErrorCount, 3);
  assert.equal(diffArea.isChunkStored(0), true);
  assert.equal(diffArea.isChunkStored(3), true);
  const imageHead = new Uint8Array(4096);
  await diffArea.readImage(0, imageHead);
  assert.deepEqual(imageHead, before.subarray(0, 4096));
  assert.deepEqual(corruptions, []);

  await tracker.hold();
  tracker.setDiffArea(null);
  tracker.release();
  assert.equal(tracker.attachedDiffArea, null);
  await storage.close();
});

test("the diff area changes only while held, and a tracker joins one snapshot at a time", async () => {
  const { tracker, backend } = newTracker(MiB);
  const storage = new DiffStorage({ path: "memory:", limitBytes: 4 * MiB, growthPortionBytes: MiB });
  const makeArea = (): DiffArea =>
    new DiffArea({
      deviceName: "disk0",
      origin: backend,
      sizeBytes: MiB,
      chunkSizeBytes: 64 * KiB,
      storage,
      onCowError: "break-snapshot",
      onCorrupted: () => {},
    });
  const area = makeArea();
  assert.throws(() => tracker.setDiffArea(area), AssertionError);
  await tracker.hold();
  tracker.setDiffArea(area);
  assert.throws(() => tracker.setDiffArea(makeArea()), AssertionError);
  tracker.release();
  await storage.close();
});

import assert from "node:assert/strict";
import { test } from "node:test";
import { BlockError, type Errno } from "../block/errors.js";
import { CbtMap, snapNumberMax } from "./cbt-map.js";

const KiB = 1024;
const MiB = 1024 * KiB;
const block = 64 * KiB;

function isErrno(errno: Errno): (error: unknown) => boolean {
  return (error: unknown) => error instanceof BlockError && error.errno === errno;
}

/** Indexes of the non-zero bytes of a map, with their values. */
function marks(map: Uint8Array): Array<[number, number]> {
  const found: Array<[number, number]> = [];
  map.forEach((value, index) => {
    if (value !== 0) found.push([index, value]);
  });
  return found;
}

test("a new CBT map: generation id, zero maps, changesNumber 0, active 1, two bytes per block", () => {
  const cbt = new CbtMap(64 * MiB);
  assert.equal(cbt.blockSizeBytes, block);
  assert.equal(cbt.blockCount, 1024);
  assert.equal(cbt.changesNumber, 0);
  assert.equal(cbt.activeNumber, 1);
  assert.match(cbt.generationId, /^[0-9a-f]{8}-[0-9a-f]{4}-4[0-9a-f]{3}-[89ab][0-9a-f]{3}-[0-9a-f]{12}$/);
  assert.notEqual(new CbtMap(64 * MiB).generationId, cbt.generationId);
  const readMap = cbt.readMapCopy();
  const writeMap = cbt.writeMapCopy();
  // Memory: one byte per block in each of the two maps.
  assert.equal(readMap.byteLength + writeMap.byteLength, 2 * cbt.blockCount);
  assert.deepEqual(marks(readMap), []);
  assert.deepEqual(marks(writeMap), []);
  assert.deepEqual(cbt.info(), {
    blockSizeBytes: block,
    deviceSizeBytes: 64 * MiB,
    blockCount: 1024,
    generationId: cbt.generationId,
    changesNumber: 0,
    generationReason: "attached",
    generationStartedAt: cbt.info().generationStartedAt,
  });
  assert.ok(Math.abs(Date.parse(cbt.info().generationStartedAt) - Date.now()) < 60_000);
  const partial = new CbtMap(3 * block + 1);
  assert.equal(partial.blockCount, 4);
  assert.equal(partial.writeMapCopy().byteLength, 4);
});

test("set marks every touched block of the write map with the active number, whole blocks only", () => {
  const cbt = new CbtMap(16 * block);
  cbt.set(block - 1, 2); // straddles blocks 0 and 1
  cbt.set(5 * block, block); // exactly block 5
  cbt.set(15 * block + 100, 1); // inside the last block
  assert.deepEqual(marks(cbt.writeMapCopy()), [
    [0, 1],
    [1, 1],
    [5, 1],
    [15, 1],
  ]);
  // The read map is frozen: origin writes never change it.
  assert.deepEqual(marks(cbt.readMapCopy()), []);
});

test("switchAtTake copies the write map, numbers the epochs and never lowers a mark", () => {
  const cbt = new CbtMap(8 * block);
  const generationId = cbt.generationId;
  cbt.set(0, 1);
  cbt.switchAtTake(8 * block);
  assert.equal(cbt.changesNumber, 1);
  assert.equal(cbt.activeNumber, 2);
  assert.equal(cbt.generationId, generationId);
  assert.deepEqual(marks(cbt.readMapCopy()), [[0, 1]]);
  cbt.set(2 * block, 1);
  cbt.set(0, 1);
  assert.deepEqual(marks(cbt.writeMapCopy()), [
    [0, 2],
    [2, 2],
  ]);
  assert.deepEqual(marks(cbt.readMapCopy()), [[0, 1]]);
  cbt.switchAtTake(8 * block);
  assert.equal(cbt.changesNumber, 2);
  assert.deepEqual(marks(cbt.readMapCopy()), [
    [0, 2],
    [2, 2],
  ]);
  // A block untouched since epoch 1 keeps its old number in later maps.
  cbt.set(2 * block, 1);
  cbt.switchAtTake(8 * block);
  assert.deepEqual(marks(cbt.readMapCopy()), [
    [0, 2],
    [2, 3],
  ]);
  assert.equal(cbt.info().changesNumber, 3);
});

test("setBoth raises the write map to active and the read map to previous", () => {
  const cbt = new CbtMap(8 * block);
  cbt.switchAtTake(8 * block);
  cbt.switchAtTake(8 * block); // previous 2, active 3
  assert.equal(cbt.changesNumber, 2);
  cbt.setBoth(3 * block + 5, block); // blocks 3 and 4
  assert.deepEqual(marks(cbt.writeMapCopy()), [
    [3, 3],
    [4, 3],
  ]);
  assert.deepEqual(marks(cbt.readMapCopy()), [
    [3, 2],
    [4, 2],
  ]);
  // The next take reports them again (active 3 > the current baseline 2).
  cbt.switchAtTake(8 * block);
  assert.deepEqual(marks(cbt.readMapCopy()), [
    [3, 3],
    [4, 3],
  ]);
  // setBoth never lowers a mark: a block written in the live epoch keeps its number.
  cbt.set(6 * block, 1);
  cbt.setBoth(6 * block, 1);
  assert.equal(cbt.writeMapCopy()[6], 4);
});

test("setBoth before the first take raises the write map only (previous is 0)", () => {
  const cbt = new CbtMap(4 * block);
  cbt.setBoth(0, 1);
  assert.deepEqual(marks(cbt.writeMapCopy()), [[0, 1]]);
  assert.deepEqual(marks(cbt.readMapCopy()), []);
});

test("readMapCopy is a copy: stable while later writes happen", () => {
  const cbt = new CbtMap(4 * MiB);
  cbt.set(0, 4 * MiB);
  cbt.switchAtTake(4 * MiB);
  const before = cbt.readMapCopy();
  const snapshotOfBefore = before.slice();
  before[0] = 200; // a caller mutating its copy changes nothing inside
  for (let i = 0; i < 64; i++) cbt.set(i * block, block);
  cbt.setBoth(0, 4 * MiB); // raises the read map to previous (1): no value changes
  const after = cbt.readMapCopy();
  assert.deepEqual(after, snapshotOfBefore);
  assert.notEqual(after, before);
});

test("the take whose active number passes 255 starts a new generation like a reset; the next take reports 2", () => {
  const cbt = new CbtMap(4 * block);
  const firstGeneration = cbt.generationId;
  for (let take = 1; take < snapNumberMax; take++) {
    cbt.set((take % 4) * block, 1);
    cbt.switchAtTake(4 * block);
    assert.equal(cbt.changesNumber, take);
    assert.equal(cbt.activeNumber, take + 1);
    assert.equal(cbt.generationId, firstGeneration);
  }
  // 254 takes done: previous 254, active 255. The next take cannot number later writes 256.
  cbt.set(block, 1);
  cbt.switchAtTake(4 * block);
  assert.equal(cbt.changesNumber, 1);
  assert.equal(cbt.activeNumber, 2);
  assert.notEqual(cbt.generationId, firstGeneration);
  const wrapGeneration = cbt.generationId;
  assert.deepEqual(marks(cbt.readMapCopy()), [], "a new generation starts with empty maps");
  assert.deepEqual(marks(cbt.writeMapCopy()), []);
  // A backup at the wrap saves {wrapGeneration, 1}; blocks written afterwards must read as newer than 1.
  cbt.set(2 * block, 1);
  assert.deepEqual(marks(cbt.writeMapCopy()), [[2, 2]]);
  cbt.switchAtTake(4 * block);
  assert.equal(cbt.changesNumber, 2);
  assert.equal(cbt.activeNumber, 3);
  assert.equal(cbt.generationId, wrapGeneration);
  assert.deepEqual(marks(cbt.readMapCopy()), [[2, 2]]);
  assert.ok((cbt.readMapCopy()[2] ?? 0) > 1, "the write after the wrap is seen by an incremental backup");
});

test("reset zeroes both maps and starts a new generation", () => {
  const cbt = new CbtMap(4 * block);
  cbt.set(0, 4 * block);
  cbt.switchAtTake(4 * block);
  cbt.set(0, 1);
  const generationId = cbt.generationId;
  cbt.reset();
  assert.notEqual(cbt.generationId, generationId);
  assert.equal(cbt.changesNumber, 0);
  assert.equal(cbt.activeNumber, 1);
  assert.deepEqual(marks(cbt.readMapCopy()), []);
  assert.deepEqual(marks(cbt.writeMapCopy()), []);
  assert.equal(cbt.blockCount, 4);
});

test("an out-of-range set corrupts the map until the next take, which resets it", () => {
  const cbt = new CbtMap(4 * block);
  cbt.set(0, 1);
  cbt.switchAtTake(4 * block);
  cbt.set(block, 1);
  const generationId = cbt.generationId;
  assert.throws(() => cbt.set(3 * block, block + 1), isErrno("EINVAL"));
  assert.equal(cbt.isCorrupted, true);
  // Nothing of the failing range was marked (the write map keeps epoch 1's mark), and later marks fail.
  assert.deepEqual(marks(cbt.writeMapCopy()), [
    [0, 1],
    [1, 2],
  ]);
  assert.throws(() => cbt.set(0, 1), isErrno("EINVAL"));
  assert.throws(() => cbt.setBoth(0, 1), isErrno("EINVAL"));
  assert.throws(() => cbt.readMapCopy(), isErrno("EFAULT"));
  // Info is still returned.
  assert.equal(cbt.info().generationId, generationId);
  assert.equal(cbt.info().changesNumber, 1);
  cbt.switchAtTake(4 * block);
  assert.equal(cbt.isCorrupted, false);
  assert.notEqual(cbt.generationId, generationId);
  // Reset, then switched: previous 1, active 2, and the old marks are gone.
  assert.equal(cbt.changesNumber, 1);
  assert.equal(cbt.activeNumber, 2);
  assert.deepEqual(marks(cbt.readMapCopy()), []);
  cbt.set(0, 1);
  assert.deepEqual(marks(cbt.writeMapCopy()), [[0, 2]]);
});

test("a changed device size at take resets the map to the new size", () => {
  const cbt = new CbtMap(4 * block);
  cbt.set(0, 4 * block);
  cbt.switchAtTake(4 * block);
  const generationId = cbt.generationId;
  cbt.switchAtTake(6 * block + 1);
  assert.notEqual(cbt.generationId, generationId);
  assert.equal(cbt.changesNumber, 1);
  assert.equal(cbt.blockCount, 7);
  assert.equal(cbt.info().deviceSizeBytes, 6 * block + 1);
  assert.equal(cbt.readMapCopy().byteLength + cbt.writeMapCopy().byteLength, 2 * 7);
  assert.deepEqual(marks(cbt.readMapCopy()), []);
  // The grown range is now inside the map.
  cbt.set(6 * block, 1);
  assert.deepEqual(marks(cbt.writeMapCopy()), [[6, 2]]);
  // The same size again: no reset.
  const grownGeneration = cbt.generationId;
  cbt.switchAtTake(6 * block + 1);
  assert.equal(cbt.generationId, grownGeneration);
  assert.equal(cbt.changesNumber, 2);
});

/** The changed runs as [startBytes, lengthBytes] pairs, from `offsetBytes`. */
function changedSpans(cbt: CbtMap, offsetBytes: number, lengthBytes: number): Array<[number, number]> {
  const spans: Array<[number, number]> = [];
  let positionBytes = offsetBytes;
  for (const run of cbt.changedRuns(offsetBytes, lengthBytes)) {
    if (run.changed) spans.push([positionBytes, run.lengthBytes]);
    positionBytes += run.lengthBytes;
  }
  return spans;
}

test("changedRuns: nothing is changed before the first take, even with writes", () => {
  const cbt = new CbtMap(4 * MiB);
  cbt.set(0, 3 * block);
  assert.deepEqual(cbt.changedRuns(0, 4 * MiB), [{ lengthBytes: 4 * MiB, changed: false }]);
});

test("changedRuns: reports the blocks written in the last epoch only, merged into runs", () => {
  const cbt = new CbtMap(4 * MiB);
  cbt.set(0, block); // epoch 1
  cbt.switchAtTake(4 * MiB); // changesNumber 1
  assert.deepEqual(changedSpans(cbt, 0, 4 * MiB), [[0, block]]);
  cbt.set(2 * block + 5, 2 * block); // touches blocks 2..4, epoch 2
  cbt.set(10 * block, 1); // block 10
  cbt.switchAtTake(4 * MiB); // changesNumber 2: block 0 (epoch 1) is no longer changed
  assert.equal(cbt.changesNumber, 2);
  assert.deepEqual(changedSpans(cbt, 0, 4 * MiB), [
    [2 * block, 3 * block],
    [10 * block, block],
  ]);
  const runs = cbt.changedRuns(0, 4 * MiB);
  assert.equal(
    runs.reduce((sum, run) => sum + run.lengthBytes, 0),
    4 * MiB,
    "the runs cover the whole range",
  );
  assert.equal(runs.length, 5, "unchanged, changed, unchanged, changed, unchanged");
  // Later origin writes go to the live map only: the answer stays that of the take.
  cbt.set(0, 4 * MiB);
  assert.deepEqual(changedSpans(cbt, 0, 4 * MiB), [
    [2 * block, 3 * block],
    [10 * block, block],
  ]);
});

test("changedRunsSince: the blocks changed after any earlier take of the generation", () => {
  const cbt = new CbtMap(4 * MiB);
  cbt.set(0, block); // epoch 1
  cbt.switchAtTake(4 * MiB); // take 1
  cbt.set(5 * block, block); // epoch 2
  cbt.switchAtTake(4 * MiB); // take 2
  cbt.set(9 * block, block); // epoch 3
  cbt.switchAtTake(4 * MiB); // take 3
  const spans = (since: number) =>
    cbt.changedRunsSince(since, 0, 4 * MiB).reduce<{ at: number; spans: Array<[number, number]> }>(
      (state, run) => {
        if (run.changed) state.spans.push([state.at, run.lengthBytes]);
        return { at: state.at + run.lengthBytes, spans: state.spans };
      },
      { at: 0, spans: [] },
    ).spans;
  assert.deepEqual(spans(2), [[9 * block, block]]);
  assert.deepEqual(spans(1), [
    [5 * block, block],
    [9 * block, block],
  ]);
  assert.deepEqual(spans(0), [
    [0, block],
    [5 * block, block],
    [9 * block, block],
  ]);
  assert.deepEqual(cbt.changedRunsSince(2, 0, 4 * MiB), cbt.changedRuns(0, 4 * MiB));
  assert.throws(() => cbt.changedRunsSince(3, 0, block), /AssertionError|take before the last/);
});

test("changedRuns: setBoth (mark-dirty) raises a block into the current answer", () => {
  const cbt = new CbtMap(4 * MiB);
  cbt.switchAtTake(4 * MiB);
  assert.deepEqual(changedSpans(cbt, 0, 4 * MiB), []);
  cbt.setBoth(7 * block, block);
  assert.deepEqual(changedSpans(cbt, 0, 4 * MiB), [[7 * block, block]]);
});

test("changedRuns: starts mid-block, clips to the range and to the device size, honours runsMax", () => {
  const sizeBytes = 10 * block + 100; // a partial last block
  const cbt = new CbtMap(sizeBytes);
  cbt.set(block, block);
  cbt.set(3 * block, block);
  cbt.set(10 * block, 50);
  cbt.switchAtTake(sizeBytes);
  assert.deepEqual(cbt.changedRuns(block + 10, 20), [{ lengthBytes: 20, changed: true }]);
  assert.deepEqual(cbt.changedRuns(block + 10, block), [
    { lengthBytes: block - 10, changed: true },
    { lengthBytes: 10, changed: false },
  ]);
  assert.deepEqual(cbt.changedRuns(9 * block, 4 * block), [
    { lengthBytes: block, changed: false },
    { lengthBytes: 100, changed: true },
  ]);
  assert.deepEqual(cbt.changedRuns(sizeBytes, block), []);
  assert.deepEqual(cbt.changedRuns(0, sizeBytes, 2), [
    { lengthBytes: block, changed: false },
    { lengthBytes: block, changed: true },
  ]);
});

test("changedRuns: a corrupted map answers EFAULT", () => {
  const cbt = new CbtMap(4 * MiB);
  cbt.switchAtTake(4 * MiB);
  assert.throws(() => cbt.set(4 * MiB, 1), isErrno("EINVAL"));
  assert.throws(() => cbt.changedRuns(0, block), isErrno("EFAULT"));
});

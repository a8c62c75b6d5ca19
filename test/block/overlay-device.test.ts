import assert from "node:assert/strict";
import { test } from "node:test";
import { MemoryBackend } from "../../src/backends/memory-backend.js";
import { OverlayDevice } from "../../src/block/overlay-device.js";
import { Prng } from "../helpers/prng.js";

/** A size that is not a multiple of the block, so the short last block is exercised. */
const sizeBytes = 37 * 4096 + 1000;
const blockBytes = 16 * 1024;

async function filledBase(prng: Prng): Promise<{ base: MemoryBackend; bytes: Uint8Array }> {
  const base = new MemoryBackend(sizeBytes);
  const bytes = prng.bytes(sizeBytes);
  await base.write(0, bytes);
  return { base, bytes };
}

void test("OverlayDevice: random concurrent writes, zeroes and reads match a model; the base never changes", async () => {
  const prng = Prng.fromEnvironment();
  const { base, bytes: baseBytes } = await filledBase(prng);
  // Every backend call yields a few macrotasks, so concurrent writes really interleave.
  const scratch = new MemoryBackend(sizeBytes, { yieldCount: () => prng.int(0, 2) });
  const overlay = new OverlayDevice(base, scratch, blockBytes);
  const model = Uint8Array.from(baseBytes);
  for (let round = 0; round < 60; round++) {
    // Disjoint ranges per round: the order of overlapping concurrent writes is not defined.
    const starts = Array.from({ length: prng.int(1, 6) }, () => prng.int(0, sizeBytes - 1)).sort(
      (a, b) => a - b,
    );
    const writes: Promise<void>[] = [];
    starts.forEach((startBytes, index) => {
      const limitBytes = (starts[index + 1] ?? sizeBytes) - startBytes;
      if (limitBytes <= 0) return;
      const lengthBytes = prng.int(1, Math.min(limitBytes, 3 * blockBytes));
      if (prng.chance(0.2)) {
        model.fill(0, startBytes, startBytes + lengthBytes);
        writes.push(overlay.writeZeroes(startBytes, lengthBytes));
      } else {
        const data = prng.bytes(lengthBytes);
        model.set(data, startBytes);
        writes.push(overlay.write(startBytes, data));
      }
    });
    await Promise.all(writes);
    const offsetBytes = prng.int(0, sizeBytes - 1);
    const target = new Uint8Array(prng.int(1, sizeBytes - offsetBytes));
    await overlay.read(offsetBytes, target);
    assert.deepEqual(
      target,
      model.subarray(offsetBytes, offsetBytes + target.byteLength),
      `seed ${prng.seed} round ${round}`,
    );
  }
  const whole = new Uint8Array(sizeBytes);
  await overlay.read(0, whole);
  assert.deepEqual(whole, model, `seed ${prng.seed}: the whole overlay`);
  const baseNow = new Uint8Array(sizeBytes);
  await base.read(0, baseNow);
  assert.deepEqual(baseNow, baseBytes, `seed ${prng.seed}: the base is unchanged`);
});

void test("OverlayDevice: a partial first write copies its block up; untouched blocks read the base", async () => {
  const prng = new Prng(7);
  const { base, bytes: baseBytes } = await filledBase(prng);
  const overlay = new OverlayDevice(base, new MemoryBackend(sizeBytes), blockBytes);
  await overlay.write(blockBytes + 100, new Uint8Array([1, 2, 3]));
  assert.equal(overlay.writtenBlocks, 1);
  const block = new Uint8Array(blockBytes);
  await overlay.read(blockBytes, block);
  const expected = Uint8Array.from(baseBytes.subarray(blockBytes, 2 * blockBytes));
  expected.set([1, 2, 3], 100);
  assert.deepEqual(block, expected);
  const untouched = new Uint8Array(blockBytes);
  await overlay.read(3 * blockBytes, untouched);
  assert.deepEqual(untouched, baseBytes.subarray(3 * blockBytes, 4 * blockBytes));
});

/**
 * The origin write fast path (DiffArea.preserveForOriginWrite): a write whose chunks are all preserved
 * goes straight to the backend, in the same synchronous step, with no chunk lock. It must never pass a
 * write that races the copy of its chunk: such a write finds the chunk not yet stored and waits for the
 * copy's lock. Seeded random rounds, a backend with random latency (so copies are slow and writes pile up
 * behind them): per round a fresh snapshot, some chunks preserved first (their writes take the fast path),
 * then concurrent origin writes to disjoint ranges — several per chunk, to chunks being copied and to
 * chunks already preserved — and image reads. The image must show only pre-snapshot bytes, the origin
 * exactly the writes. Replay with BLOCKSNAP_SEED=<seed>.
 */
import assert from "node:assert/strict";
import { test } from "node:test";
import { MemoryBackend } from "../../src/backends/memory-backend.js";
import { Engine } from "../../src/engine/engine.js";
import { Prng } from "../helpers/prng.js";
import { assertSnapshotRoundHeld } from "../helpers/snapshot-round.js";

test("origin writes racing the copy of their chunk wait for it; writes to preserved chunks pass", async (t) => {
  const random = Prng.fromEnvironment();
  t.diagnostic(`seed ${random.seed} (replay with BLOCKSNAP_SEED=${random.seed})`);
  const chunkSizeBytes = 8 * 1024;
  const chunkCount = 12;
  const sizeBytes = chunkCount * chunkSizeBytes;
  const sectorBytes = 512;
  const engine = new Engine();
  const backend = new MemoryBackend(sizeBytes, { yieldCount: () => random.int(0, 3) });
  await engine.addDevice({ name: "d", backendPath: "memory:", backend, sizeBytes });
  const origin = engine.findExport("d")!.device;
  const model = new Uint8Array(sizeBytes);
  let racingWrites = 0;
  let fastPathWrites = 0;
  try {
    for (let round = 0; round < 150; round++) {
      const before = (round * 2) & 0xff;
      const after = (round * 2 + 1) & 0xff;
      model.fill(before);
      await origin.write(0, model);
      const { id } = await engine.createSnapshot({
        storage: "memory:",
        limitBytes: 4 << 20,
        chunkSizeBytes,
        devices: ["d"],
      });
      await engine.takeSnapshot(id);
      const image = engine.findExport(`d@${id}`)!.device;
      const diffArea = engine.tracker("d").attachedDiffArea!;
      // Preserve some chunks first: writes to them below take the fast path.
      for (let chunkIndex = 0; chunkIndex < chunkCount; chunkIndex++) {
        if (!random.chance(0.4)) continue;
        const offsetBytes = chunkIndex * chunkSizeBytes + random.int(0, 15) * sectorBytes;
        const lengthBytes = sectorBytes;
        await origin.write(offsetBytes, new Uint8Array(lengthBytes).fill(after));
        model.fill(after, offsetBytes, offsetBytes + lengthBytes);
      }
      // Concurrent writes to disjoint sector ranges (their order cannot matter), and image reads.
      const operations: Promise<void>[] = [];
      const imageReads: Uint8Array[] = [];
      const claimed = new Uint8Array(sizeBytes / sectorBytes);
      for (let k = 0; k < 24; k++) {
        if (random.chance(0.25)) {
          const chunkIndex = random.int(0, chunkCount - 1);
          const target = new Uint8Array(random.int(1, 2 * chunkSizeBytes));
          const offsetBytes = Math.min(chunkIndex * chunkSizeBytes, sizeBytes - target.byteLength);
          imageReads.push(target);
          operations.push(image.read(offsetBytes, target));
          continue;
        }
        const firstSector = random.int(0, claimed.length - 1);
        let sectors = 0;
        while (sectors < 3 && firstSector + sectors < claimed.length && claimed[firstSector + sectors] === 0)
          claimed[firstSector + sectors++] = 1;
        if (sectors === 0) continue;
        const offsetBytes = firstSector * sectorBytes;
        const lengthBytes = sectors * sectorBytes;
        const firstChunk = Math.floor(offsetBytes / chunkSizeBytes);
        const lastChunk = Math.floor((offsetBytes + lengthBytes - 1) / chunkSizeBytes);
        let allStored = true;
        for (let chunkIndex = firstChunk; chunkIndex <= lastChunk; chunkIndex++)
          allStored &&= diffArea.isChunkStored(chunkIndex);
        if (allStored) fastPathWrites++;
        else racingWrites++;
        const value = (after + 1 + k) & 0xff;
        operations.push(origin.write(offsetBytes, new Uint8Array(lengthBytes).fill(value)));
        model.fill(value, offsetBytes, offsetBytes + lengthBytes);
      }
      await Promise.all(operations);
      await assertSnapshotRoundHeld({
        image,
        origin,
        imageReads,
        before,
        model,
        context: `round ${round} (seed ${random.seed})`,
      });
      await engine.destroySnapshot(id);
    }
  } finally {
    await engine.close();
  }
  t.diagnostic(`${racingWrites} writes issued while a chunk of theirs was absent, ${fastPathWrites} fast`);
  // Both paths must have been exercised many times for the test to mean anything.
  assert.ok(racingWrites > 300 && fastPathWrites > 300, `${racingWrites} racing, ${fastPathWrites} fast`);
});

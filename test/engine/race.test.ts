/**
 * The race that blksnap's up code leaves to the block layer (reference §1.7): an image read of a chunk that
 * is still on the origin, racing an origin write to the same chunk. Over many iterations with random
 * backend latency the image must never show a post-snapshot byte.
 */
import assert from "node:assert/strict";
import { test } from "node:test";
import { MemoryBackend } from "../../src/backends/memory-backend.js";
import { Engine } from "../../src/engine/engine.js";
import { Prng } from "../helpers/prng.js";

test("image reads racing origin writes of the same chunk never see post-snapshot bytes", async (t) => {
  const random = Prng.fromEnvironment();
  t.diagnostic(`seed ${random.seed}`);
  const chunkSizeBytes = 16 * 1024;
  const sizeBytes = 16 * chunkSizeBytes;
  const engine = new Engine();
  const backend = new MemoryBackend(sizeBytes, { yieldCount: () => random.int(0, 3) });
  await engine.addDevice({ name: "d", backendPath: "memory:", backend, sizeBytes });
  const origin = engine.findExport("d")!.device;
  let racedReads = 0;
  for (let iteration = 0; iteration < 300; iteration++) {
    const before = (iteration * 2) & 0xff;
    const after = (iteration * 2 + 1) & 0xff;
    await origin.write(0, new Uint8Array(sizeBytes).fill(before));
    const { id } = await engine.createSnapshot({
      storage: "memory:",
      limitBytes: 4 << 20,
      chunkSizeBytes,
      devices: ["d"],
    });
    await engine.takeSnapshot(id);
    const image = engine.findExport(`d@${id}`)!.device;
    const chunkIndex = random.int(0, 15);
    const operations: Promise<void>[] = [];
    const targets: Uint8Array[] = [];
    for (let k = 0; k < 6; k++) {
      const offsetBytes = chunkIndex * chunkSizeBytes + random.int(0, 31) * 512;
      const lengthBytes = Math.min(random.int(1, 16) * 512, sizeBytes - offsetBytes);
      if (k % 2 === 0) {
        operations.push(origin.write(offsetBytes, new Uint8Array(lengthBytes).fill(after)));
      } else {
        const target = new Uint8Array(lengthBytes);
        targets.push(target);
        operations.push(image.read(offsetBytes, target));
        racedReads++;
      }
    }
    await Promise.all(operations);
    for (const target of targets) {
      const leaked = target.findIndex((byte) => byte !== before);
      assert.equal(
        leaked,
        -1,
        `iteration ${iteration}: image showed byte ${target[leaked]} (seed ${random.seed})`,
      );
    }
    await engine.destroySnapshot(id);
  }
  assert.equal(racedReads, 900);
  await engine.close();
});

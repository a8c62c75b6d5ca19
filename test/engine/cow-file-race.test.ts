/**
 * Copy-before-write on a file origin with a directory storage: the path the NBD server takes on real
 * files (the chunk read by FileBackend from the page cache, the copy written by the storage's
 * file system writer thread from a shared buffer, the origin write after it on that thread). The memory
 * backends of the model tests never take it. Seeded random rounds: per round the origin is filled with
 * one byte value, a snapshot is taken, then concurrent origin writes to disjoint ranges (several per
 * chunk, some across chunk boundaries, some to chunks already preserved) and image reads run together.
 * The image must show only the pre-snapshot bytes, the origin exactly the writes, the storage one chunk
 * per chunk written. Replay with BLOCKSNAP_SEED=<seed>.
 */
import assert from "node:assert/strict";
import { mkdtempSync, rmSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { test } from "node:test";
import { Engine } from "../../src/engine/engine.js";
import { Prng } from "../helpers/prng.js";
import { assertSnapshotRoundHeld } from "../helpers/snapshot-round.js";

test("copy-before-write on a file origin with file storage keeps the image exact under concurrent writes", async (t) => {
  const random = Prng.fromEnvironment();
  t.diagnostic(`seed ${random.seed} (replay with BLOCKSNAP_SEED=${random.seed})`);
  const chunkSizeBytes = 16 * 1024;
  const chunkCount = 24;
  const sizeBytes = chunkCount * chunkSizeBytes;
  const sectorBytes = 512;
  const directory = mkdtempSync(join(tmpdir(), "blocksnap-cow-file-race-"));
  const engine = new Engine();
  let writesToAbsentChunks = 0;
  try {
    await engine.addDevice({ name: "d", backendPath: join(directory, "origin.img"), sizeBytes });
    const origin = engine.findExport("d")!.device;
    const model = new Uint8Array(sizeBytes);
    for (let round = 0; round < 60; round++) {
      const before = (round * 2) & 0xff;
      const after = (round * 2 + 1) & 0xff;
      model.fill(before);
      await origin.write(0, model);
      const { id } = await engine.createSnapshot({
        storage: directory,
        limitBytes: 64 << 20,
        chunkSizeBytes,
        devices: ["d"],
      });
      await engine.takeSnapshot(id);
      const image = engine.findExport(`d@${id}`)!.device;
      const diffArea = engine.tracker("d").attachedDiffArea!;
      const operations: Promise<void>[] = [];
      const imageReads: Uint8Array[] = [];
      const claimed = new Uint8Array(sizeBytes / sectorBytes);
      const touched = new Set<number>();
      for (let k = 0; k < 48; k++) {
        if (random.chance(0.2)) {
          const target = new Uint8Array(random.int(1, 3 * chunkSizeBytes));
          const offsetBytes = random.int(0, sizeBytes - target.byteLength);
          imageReads.push(target);
          operations.push(image.read(offsetBytes, target));
          continue;
        }
        const firstSector = random.int(0, claimed.length - 1);
        let sectors = 0;
        const sectorsMax = random.chance(0.2) ? 40 : 8;
        while (
          sectors < sectorsMax &&
          firstSector + sectors < claimed.length &&
          claimed[firstSector + sectors] === 0
        )
          claimed[firstSector + sectors++] = 1;
        if (sectors === 0) continue;
        const offsetBytes = firstSector * sectorBytes;
        const lengthBytes = sectors * sectorBytes;
        const firstChunk = Math.floor(offsetBytes / chunkSizeBytes);
        const lastChunk = Math.floor((offsetBytes + lengthBytes - 1) / chunkSizeBytes);
        for (let chunkIndex = firstChunk; chunkIndex <= lastChunk; chunkIndex++) {
          if (!diffArea.isChunkStored(chunkIndex)) writesToAbsentChunks++;
          touched.add(chunkIndex);
        }
        const value = (after + k) & 0xff;
        operations.push(origin.write(offsetBytes, new Uint8Array(lengthBytes).fill(value)));
        model.fill(value, offsetBytes, offsetBytes + lengthBytes);
        // Sometimes let the copies start before more writes come.
        if (random.chance(0.15)) await new Promise((resolve) => setImmediate(resolve));
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
      assert.equal(
        engine.snapshotInfo(id).devices[0]?.chunksStored,
        touched.size,
        `round ${round}: one stored chunk per chunk written (seed ${random.seed})`,
      );
      await engine.destroySnapshot(id);
    }
  } finally {
    await engine.close();
    rmSync(directory, { recursive: true, force: true });
  }
  t.diagnostic(`${writesToAbsentChunks} chunk writes found their chunk absent`);
  assert.ok(writesToAbsentChunks > 500, `only ${writesToAbsentChunks} writes raced a copy`);
});

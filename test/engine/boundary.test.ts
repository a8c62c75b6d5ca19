/**
 * Boundary tests of copy-before-write and the snapshot image: first and last byte of a chunk, requests
 * straddling chunk borders through the origin and through the image, 512-byte-granular unaligned I/O,
 * devices whose size is not a multiple of the chunk or of the CBT block.
 */
import assert from "node:assert/strict";
import { test } from "node:test";
import type { BlockDevice } from "../../src/block/device.js";
import { Engine } from "../../src/engine/engine.js";

const KiB = 1024;

function fill(lengthBytes: number, value: number): Uint8Array {
  return new Uint8Array(lengthBytes).fill(value);
}

async function readAll(device: BlockDevice): Promise<Uint8Array> {
  const target = new Uint8Array(device.sizeBytes);
  await device.read(0, target);
  return target;
}

async function setup(sizeBytes: number, chunkSizeBytes: number, cbtBlockSizeBytes?: number) {
  const engine = new Engine();
  await engine.addDevice({ name: "d", backendPath: "memory:", sizeBytes, cbtBlockSizeBytes });
  const origin = engine.findExport("d")!.device;
  const initial = new Uint8Array(sizeBytes).map((_, i) => (i * 7 + (i >> 12)) & 0xff);
  await origin.write(0, initial);
  const { id } = await engine.createSnapshot({
    storage: "memory:",
    limitBytes: 64 << 20,
    chunkSizeBytes,
    devices: ["d"],
  });
  await engine.takeSnapshot(id);
  const image = engine.findExport(`d@${id}`)!.device;
  return { engine, origin, image, initial, id };
}

test("writes to the first and last byte of a chunk preserve exactly that chunk", async () => {
  const chunk = 64 * KiB;
  const { engine, origin, image, initial, id } = await setup(8 * chunk, chunk);
  await origin.write(2 * chunk, fill(1, 0xee));
  await origin.write(4 * chunk - 1, fill(1, 0xdd));
  assert.deepEqual(await readAll(image), initial);
  const info = engine.snapshotInfo(id);
  assert.equal(info.devices[0]?.chunksStored, 2);
  assert.equal(engine.tracker("d").attachedDiffArea?.isChunkStored(2), true);
  assert.equal(engine.tracker("d").attachedDiffArea?.isChunkStored(3), true);
  assert.equal(engine.tracker("d").attachedDiffArea?.isChunkStored(1), false);
  assert.equal(engine.tracker("d").attachedDiffArea?.isChunkStored(4), false);
  await engine.close();
});

test("origin writes straddling chunk borders preserve every chunk they touch", async () => {
  const chunk = 16 * KiB;
  const { engine, origin, image, initial } = await setup(10 * chunk, chunk);
  const expectedOrigin = initial.slice();
  for (const [offsetBytes, lengthBytes] of [
    [chunk - 512, 1024],
    [3 * chunk - 1, 2 * chunk + 2],
    [7 * chunk + 100, chunk],
  ] as const) {
    const data = fill(lengthBytes, 0x5a);
    await origin.write(offsetBytes, data);
    expectedOrigin.set(data, offsetBytes);
  }
  assert.deepEqual(await readAll(image), initial);
  assert.deepEqual(await readAll(origin), expectedOrigin);
  await engine.close();
});

test("image writes straddling chunk borders land in the image only, unaligned at 512-byte granularity", async () => {
  const chunk = 256 * KiB;
  const { engine, origin, image, initial } = await setup(24 * chunk, chunk);
  const expectedImage = initial.slice();
  // The unaligned 1 MiB writes of the FUSE scenario, and small 512-byte-granular ones.
  for (const offsetBytes of [126 * KiB, 2174 * KiB, 4222 * KiB]) {
    const data = new Uint8Array(1024 * KiB).map((_, i) => (i + offsetBytes / 512) & 0xff);
    const lengthBytes = Math.min(data.byteLength, image.sizeBytes - offsetBytes);
    await image.write(offsetBytes, data.subarray(0, lengthBytes));
    expectedImage.set(data.subarray(0, lengthBytes), offsetBytes);
  }
  for (let offsetBytes = chunk - 3 * 512; offsetBytes < chunk + 3 * 512; offsetBytes += 512) {
    const data = fill(512, (offsetBytes / 512) & 0xff);
    await image.write(offsetBytes, data);
    expectedImage.set(data, offsetBytes);
  }
  assert.deepEqual(await readAll(image), expectedImage);
  assert.deepEqual(await readAll(origin), initial);
  // Reads at every 512-byte-granular offset across a border agree with whole-device reads.
  for (let offsetBytes = 2 * chunk - 2048; offsetBytes < 2 * chunk + 2048; offsetBytes += 512) {
    const target = new Uint8Array(1536);
    await image.read(offsetBytes, target);
    assert.deepEqual(target, expectedImage.subarray(offsetBytes, offsetBytes + 1536));
  }
  await engine.close();
});

test("a device whose size is not a multiple of the chunk or the CBT block has a short last chunk", async () => {
  const chunk = 64 * KiB;
  const sizeBytes = 5 * chunk + 3 * 512 + 7;
  const { engine, origin, image, initial, id } = await setup(sizeBytes, chunk, 16 * KiB);
  const info = engine.cbtInfo("d");
  assert.equal(info.blockCount, Math.ceil(sizeBytes / (16 * KiB)));
  // Write the very last byte through the origin, then the last 100 bytes through the image.
  await origin.write(sizeBytes - 1, fill(1, 0x11));
  const tail = fill(100, 0x22);
  await image.write(sizeBytes - 100, tail);
  const expectedImage = initial.slice();
  expectedImage.set(tail, sizeBytes - 100);
  assert.deepEqual(await readAll(image), expectedImage);
  const expectedOrigin = initial.slice();
  expectedOrigin[sizeBytes - 1] = 0x11;
  assert.deepEqual(await readAll(origin), expectedOrigin);
  // The short last chunk is stored with its real length: storage use is one full chunk at most.
  const used = engine.snapshotInfo(id).storage.usedBytes;
  assert.ok(used <= chunk, `short last chunk stored in ${used} bytes`);
  const map = engine.cbtRead("d");
  assert.equal(map[map.length - 1], 1, "written before the take: epoch 1 in the map frozen at take");
  assert.equal(engine.tracker("d").cbt.writeMapCopy()[info.blockCount - 1], 2);
  await engine.close();
});

test("writeZeroes and trim on the origin are copied before they change it", async () => {
  const chunk = 4 * KiB;
  const { engine, origin, image, initial } = await setup(64 * KiB, chunk);
  await origin.writeZeroes(3 * chunk + 17, 2 * chunk);
  await origin.trim(10 * chunk, 3 * chunk);
  assert.deepEqual(await readAll(image), initial);
  const now = await readAll(origin);
  assert.deepEqual(now.subarray(3 * chunk + 17, 5 * chunk + 17), new Uint8Array(2 * chunk));
  await engine.close();
});

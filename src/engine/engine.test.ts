import assert from "node:assert/strict";
import { test } from "node:test";
import { BlockError } from "../block/errors.js";
import { Engine } from "./engine.js";

const MiB = 1024 * 1024;

function pattern(lengthBytes: number, seed: number): Uint8Array {
  return new Uint8Array(lengthBytes).map((_, i) => (i * 31 + seed) & 0xff);
}

test("Engine: an image keeps the bytes of the moment of take while the origin moves on", async () => {
  const engine = new Engine();
  await engine.addDevice({ name: "disk0", backendPath: "memory:", sizeBytes: 4 * MiB });
  const origin = engine.findExport("disk0")!.device;
  const before = pattern(MiB, 1);
  await origin.write(0, before);
  const snapshot = await engine.createSnapshot({
    storage: "memory:",
    limitBytes: 8 * MiB,
    devices: ["disk0"],
  });
  await engine.takeSnapshot(snapshot.id);
  const after = pattern(MiB, 2);
  await origin.write(0, after);
  const image = engine.findExport(`disk0@${snapshot.id}`)!.device;
  const fromImage = new Uint8Array(MiB);
  await image.read(0, fromImage);
  assert.deepEqual(fromImage, before);
  const fromOrigin = new Uint8Array(MiB);
  await origin.read(0, fromOrigin);
  assert.deepEqual(fromOrigin, after);
  await engine.destroySnapshot(snapshot.id);
  await assert.rejects(
    image.read(0, fromImage),
    (e: unknown) => e instanceof BlockError && e.errno === "EIO",
  );
  assert.equal(engine.findExport(`disk0@${snapshot.id}`), undefined);
  await engine.close();
});

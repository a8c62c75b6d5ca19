import assert from "node:assert/strict";
import { test } from "node:test";
import { BlockError } from "../block/errors.js";
import { Engine } from "./engine.js";
import type { Freezer } from "./freezer.js";

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

test("Engine: take freezes before holding writes and thaws after releasing them", async () => {
  const calls: string[] = [];
  let engineRef: Engine | undefined;
  const freezer: Freezer = {
    async freeze(context) {
      const tracker = engineRef!.tracker("disk0");
      calls.push(`freeze held=${tracker.isHeld} devices=${context.deviceNames.join(",")}`);
      // A freeze flushes dirty data through blocksnap itself: that write must complete, not deadlock.
      await engineRef!.findExport("disk0")!.device.write(0, pattern(4096, 9));
      return {
        async thaw(takeError) {
          calls.push(
            `thaw held=${tracker.isHeld} attached=${tracker.attachedDiffArea !== null} error=${takeError}`,
          );
          return { frozen: [], preTake: null, postTake: null };
        },
      };
    },
  };
  const engine = new Engine({ freezer });
  engineRef = engine;
  await engine.addDevice({ name: "disk0", backendPath: "memory:", sizeBytes: MiB });
  const { id } = await engine.createSnapshot({ storage: "memory:", limitBytes: MiB, devices: ["disk0"] });
  const info = await engine.takeSnapshot(id);
  assert.deepEqual(calls, ["freeze held=false devices=disk0", "thaw held=false attached=true error=null"]);
  assert.deepEqual(info.takeReport, { frozen: [], preTake: null, postTake: null });
  // The stall in whole microseconds, not the timer's long float.
  assert.ok(info.takeStallMs !== null && info.takeStallMs >= 0);
  assert.equal(info.takeStallMs, Math.round(info.takeStallMs * 1000) / 1000, `${info.takeStallMs}`);
  // The write done during the freeze is part of the image.
  const image = new Uint8Array(4096);
  await engine.findExport(`disk0@${id}`)!.device.read(0, image);
  assert.deepEqual(image, pattern(4096, 9));
  const second = await engine.createSnapshot({ storage: "memory:", limitBytes: MiB });
  await assert.rejects(
    engine.takeSnapshot(second.id),
    (e: unknown) => e instanceof BlockError && e.errno === "ENODEV",
  );
  await engine.destroySnapshot(id);
  const third = await engine.createSnapshot({ storage: "memory:", limitBytes: MiB, devices: ["disk0"] });
  await engine.takeSnapshot(third.id, { noFreeze: true });
  assert.equal(calls.length, 2, "noFreeze skips the freezer");
  await engine.close();
});

test("the package's main export is the Engine", async () => {
  const main = (await import("blocksnap")) as { Engine?: unknown };
  assert.equal(main.Engine, Engine);
});

test("Engine: a storage limit below one chunk per device is refused at create, naming both numbers", async () => {
  const engine = new Engine();
  await engine.addDevice({ name: "disk0", backendPath: "memory:", sizeBytes: MiB });
  await assert.rejects(
    engine.createSnapshot({
      storage: "memory:",
      limitBytes: 16 * 1024,
      chunkSizeBytes: 64 * 1024,
      devices: ["disk0"],
    }),
    (e: unknown) =>
      e instanceof BlockError && e.errno === "EINVAL" && /16384/.test(e.message) && /65536/.test(e.message),
  );
  assert.equal(engine.listSnapshots().length, 0);
  assert.equal(engine.tracker("disk0").isHeld, false);
  await engine.close();
});

/**
 * Difference storage overflow and growth, for every storage kind (docs/design/semantics.md): a limit too small
 * gives exactly one `corrupted` event with ENOSPC, the image fails with EIO, and the origin keeps every
 * byte written to it; policy fail-origin-write fails the origin write instead and keeps the snapshot
 * valid; growth emits `low_space` and, at the limit, one `no_space`.
 */
import assert from "node:assert/strict";
import { mkdtempSync, rmSync, writeFileSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { after, test } from "node:test";
import { BlockError } from "../../src/block/errors.js";
import { Engine } from "../../src/engine/engine.js";
import type { SnapshotEvent } from "../../src/engine/engine-types.js";
import { isRoot, which } from "../helpers/commands.js";
import { attachLoop, detachLoop } from "../helpers/loop-device.js";

const KiB = 1024;
const chunkSizeBytes = 64 * KiB;
const directory = mkdtempSync(join(tmpdir(), "blocksnap-overflow-"));
const loopDevices: string[] = [];
after(async () => {
  for (const loop of loopDevices) await detachLoop(loop);
  rmSync(directory, { recursive: true, force: true });
});

async function drainEvents(engine: Engine, id: string): Promise<SnapshotEvent[]> {
  const events: SnapshotEvent[] = [];
  for (;;) {
    const event = await engine.waitEvent(id, 0);
    if (!event) return events;
    events.push(event);
  }
}

async function overflowScenario(storage: string, limitBytes: number) {
  const engine = new Engine();
  const sizeBytes = 2048 * KiB;
  await engine.addDevice({ name: "d", backendPath: "memory:", sizeBytes });
  const origin = engine.findExport("d")!.device;
  const model = new Uint8Array(sizeBytes).map((_, i) => i & 0xff);
  await origin.write(0, model);
  const snapshot = await engine.createSnapshot({
    storage,
    limitBytes,
    chunkSizeBytes,
    growthPortionBytes: 128 * KiB,
    devices: ["d"],
  });
  await engine.takeSnapshot(snapshot.id);
  const image = engine.findExport(`d@${snapshot.id}`)!.device;
  // Overwrite the whole origin in 64 KiB steps: every step needs one more chunk of storage.
  for (let offsetBytes = 0; offsetBytes < sizeBytes; offsetBytes += 64 * KiB) {
    const data = new Uint8Array(64 * KiB).fill((offsetBytes / KiB) & 0xff);
    await origin.write(offsetBytes, data);
    model.set(data, offsetBytes);
  }
  const events = await drainEvents(engine, snapshot.id);
  const corrupted = events.filter((event) => event.type === "corrupted");
  assert.equal(corrupted.length, 1, `one corrupted event: ${JSON.stringify(events)}`);
  assert.deepEqual(
    { ...corrupted[0], timeMs: 0 },
    { type: "corrupted", timeMs: 0, device: "d", errno: "ENOSPC" },
  );
  assert.equal(
    events.filter((event) => event.type === "no_space").length,
    1,
    `one no_space: ${JSON.stringify(events)}`,
  );
  await assert.rejects(
    image.read(0, new Uint8Array(512)),
    (e: unknown) => e instanceof BlockError && e.errno === "EIO",
  );
  await assert.rejects(
    image.write(0, new Uint8Array(512)),
    (e: unknown) => e instanceof BlockError && e.errno === "EIO",
  );
  const info = engine.snapshotInfo(snapshot.id);
  assert.equal(info.state, "corrupted");
  assert.equal(info.devices[0]?.error, "ENOSPC");
  const now = new Uint8Array(sizeBytes);
  await origin.read(0, now);
  assert.ok(Buffer.from(now).equals(model), "the origin holds every byte written to it");
  await engine.destroySnapshot(snapshot.id);
  await engine.close();
  return events;
}

test("overflow of memory: storage corrupts only the snapshot", async () => {
  const events = await overflowScenario("memory:", 512 * KiB);
  const lowSpace = events.filter((event) => event.type === "low_space");
  assert.ok(lowSpace.length >= 2, `growth in portions emits low_space: ${JSON.stringify(events)}`);
  const noSpace = events.find((event) => event.type === "no_space");
  assert.ok(noSpace && noSpace.type === "no_space" && noSpace.requestedBytes > 512 * KiB);
  // no_space comes after the last low_space and before corruption.
  const kinds = events.map((event) => event.type);
  assert.ok(kinds.indexOf("no_space") < kinds.indexOf("corrupted"));
});

test("overflow of a regular file storage corrupts only the snapshot", async () => {
  await overflowScenario(join(directory, "diff.file"), 512 * KiB);
});

test("overflow of a directory storage (anonymous temp file) corrupts only the snapshot", async () => {
  await overflowScenario(directory, 512 * KiB);
});

test("overflow of a block-device storage (loop device) corrupts only the snapshot", async (t) => {
  if (!isRoot) return t.skip("needs root for losetup");
  if (!which("losetup")) return t.skip("losetup is not installed");
  const backing = join(directory, "loop-storage.img");
  writeFileSync(backing, new Uint8Array(512 * KiB));
  const loop = await attachLoop(backing);
  loopDevices.push(loop);
  // A block device is used whole and never grows, whatever the limit says.
  const events = await overflowScenario(loop, 64 << 20);
  assert.ok(events.some((event) => event.type === "low_space"));
});

test("fail-origin-write fails the origin write and keeps the snapshot valid", async () => {
  const engine = new Engine();
  const sizeBytes = 1024 * KiB;
  await engine.addDevice({ name: "d", backendPath: "memory:", sizeBytes });
  const origin = engine.findExport("d")!.device;
  const before = new Uint8Array(sizeBytes).map((_, i) => (i >> 9) & 0xff);
  await origin.write(0, before);
  const { id } = await engine.createSnapshot({
    storage: "memory:",
    limitBytes: 256 * KiB,
    chunkSizeBytes,
    growthPortionBytes: 128 * KiB,
    onCowError: "fail-origin-write",
    devices: ["d"],
  });
  await engine.takeSnapshot(id);
  const model = before.slice();
  let failedWrites = 0;
  for (let offsetBytes = 0; offsetBytes < sizeBytes; offsetBytes += 64 * KiB) {
    const data = new Uint8Array(64 * KiB).fill(0xfe);
    try {
      await origin.write(offsetBytes, data);
      model.set(data, offsetBytes);
    } catch (error) {
      assert.ok(
        error instanceof BlockError && error.errno === "ENOSPC",
        `origin write fails with ENOSPC: ${error}`,
      );
      failedWrites++;
    }
  }
  assert.equal(failedWrites, 12, "4 chunks fit in 256 KiB; the other 12 writes fail");
  const events = await drainEvents(engine, id);
  assert.equal(events.filter((event) => event.type === "corrupted").length, 0);
  assert.equal(engine.snapshotInfo(id).state, "taken");
  const image = new Uint8Array(sizeBytes);
  await engine.findExport(`d@${id}`)!.device.read(0, image);
  assert.ok(Buffer.from(image).equals(before), "the image still holds the state at take");
  const now = new Uint8Array(sizeBytes);
  await origin.read(0, now);
  assert.ok(Buffer.from(now).equals(model), "failed writes left the origin unchanged");
  await engine.close();
});

import assert from "node:assert/strict";
import { test } from "node:test";
import type { CbtInfo } from "../cbt/cbt-map.js";
import type { SnapshotInfo } from "../engine/engine-types.js";
import { cbtInfoView, snapshotEventView, snapshotView } from "./api-mapping.js";

const cbt: CbtInfo = {
  blockSizeBytes: 65536,
  deviceSizeBytes: 1 << 20,
  blockCount: 16,
  generationId: "0f8c0c42-7c9d-4d5e-9b71-0c4f3c8e1a10",
  changesNumber: 3,
  generationReason: "attached",
  generationStartedAt: "2026-01-01T00:00:00.000Z",
};

test("api mapping: an engine field that the wire does not name stays out of the API", () => {
  const withInternal = { ...cbt, snapNumberActive: 4 } as CbtInfo;
  const view = cbtInfoView(withInternal);
  assert.deepEqual(view, cbt);
  assert.ok(!("snapNumberActive" in view));
});

test("api mapping: a snapshot gets export addresses only for devices with an image", () => {
  const info: SnapshotInfo = {
    id: "6d0c5a0e-9f39-4d55-8d0a-3a9d1a3c2b11",
    state: "taken",
    createdAtMs: 1,
    takenAtMs: 2,
    takeStallMs: 0,
    takeReport: null,
    chunkSizeBytes: 262144,
    onCowError: "break-snapshot",
    storage: { kind: "memory", paths: [], usedBytes: 0, capacityBytes: 1, limitBytes: 1 },
    devices: [
      {
        name: "a",
        imageName: "a@x",
        sizeBytes: 1,
        chunksStored: 0,
        chunksCopied: 0,
        copiedBytes: 0,
        error: null,
      },
      {
        name: "b",
        imageName: null,
        sizeBytes: 1,
        chunksStored: 0,
        chunksCopied: 0,
        copiedBytes: 0,
        error: "EIO",
      },
    ],
  };
  const asked: string[] = [];
  const view = snapshotView(info, (imageName) => {
    asked.push(imageName);
    return { nbdUris: [`nbd+unix:///${imageName}`], fusePath: null };
  });
  assert.deepEqual(asked, ["a@x"]);
  assert.deepEqual(view.devices[0]?.nbdUris, ["nbd+unix:///a@x"]);
  assert.deepEqual(view.devices[1]?.nbdUris, []);
  assert.equal(view.devices[1]?.error, "EIO");
  assert.deepEqual(view.storage, info.storage);
});

test("api mapping: events keep their type-specific fields", () => {
  assert.deepEqual(snapshotEventView({ type: "corrupted", timeMs: 5, device: "a", errno: "ENOSPC" }), {
    type: "corrupted",
    timeMs: 5,
    device: "a",
    errno: "ENOSPC",
  });
  assert.deepEqual(snapshotEventView({ type: "no_space", timeMs: 6, requestedBytes: 7 }), {
    type: "no_space",
    timeMs: 6,
    requestedBytes: 7,
  });
});

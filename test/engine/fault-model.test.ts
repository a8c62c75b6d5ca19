/**
 * The model test with faults (issue 10): the engine over origins and difference storages that fail at
 * random (FaultDevice: EIO on origin reads and writes, EIO and ENOSPC on storage reads and writes, storage
 * writes sometimes torn), under both copy-before-write policies. Operations run one at a time — the
 * concurrency is the plain model test's job; here every failure can be attributed. What must hold:
 *
 * - The origin is never wrong: a successful origin read returns exactly what the model holds; a failed
 *   origin write changed nothing (faults fire before the write), a torn one leaves its range unknown.
 * - A snapshot is correct or corrupted, never wrong: every successful image read matches the image model
 *   (bytes of a failed image write may be old or new, so they are not compared); once the snapshot is
 *   corrupted every image read fails with EIO.
 * - break-snapshot: a storage fault or an origin read fault during copy-before-write never fails the
 *   origin write; only the origin's own write fault does. fail-origin-write: the snapshot is never
 *   corrupted by an origin write; the origin write fails instead and leaves the origin as it was.
 *
 * Replay with BLOCKSNAP_SEED=<seed printed on failure>.
 */
import assert from "node:assert/strict";
import { test } from "node:test";
import { MemoryBackend } from "../../src/backends/memory-backend.js";
import type { BlockDevice } from "../../src/block/device.js";
import { BlockError } from "../../src/block/errors.js";
import { FaultDevice } from "../../src/block/fault-device.js";
import type { OnCowError } from "../../src/cow/diff-area.js";
import { Engine } from "../../src/engine/engine.js";
import { Prng } from "../helpers/prng.js";

const KiB = 1024;

/** Bytes plus which of them are known (a torn or failed write leaves a range that may be old or new). */
class ByteModel {
  readonly bytes: Uint8Array;
  readonly known: Uint8Array;

  constructor(sizeBytes: number) {
    this.bytes = new Uint8Array(sizeBytes);
    this.known = new Uint8Array(sizeBytes).fill(1);
  }

  static copyOf(model: ByteModel): ByteModel {
    const copy = new ByteModel(model.bytes.byteLength);
    copy.bytes.set(model.bytes);
    copy.known.set(model.known);
    return copy;
  }

  write(offsetBytes: number, data: Uint8Array): void {
    this.bytes.set(data, offsetBytes);
    this.known.fill(1, offsetBytes, offsetBytes + data.byteLength);
  }

  forget(offsetBytes: number, lengthBytes: number): void {
    this.known.fill(0, offsetBytes, offsetBytes + lengthBytes);
  }

  /** The first known byte that differs from `actual`, or -1. */
  firstMismatch(offsetBytes: number, actual: Uint8Array): number {
    for (let index = 0; index < actual.byteLength; index++) {
      const at = offsetBytes + index;
      if (this.known[at] === 1 && this.bytes[at] !== actual[index]) return at;
    }
    return -1;
  }
}

function errnoOf(error: unknown): string {
  if (error instanceof BlockError) return error.errno;
  throw error;
}

for (const policy of ["break-snapshot", "fail-origin-write"] as const) {
  test(`model with injected faults, ${policy}: origin never wrong, snapshot correct or corrupted`, async (t) => {
    const random = Prng.fromEnvironment();
    const rounds = Number.parseInt(process.env.BLOCKSNAP_FAULT_MODEL_ROUNDS ?? "1500", 10);
    t.diagnostic(`seed ${random.seed} (replay with BLOCKSNAP_SEED=${random.seed}), ${rounds} rounds`);
    try {
      const stats = await runFaultModel(random, rounds, policy);
      t.diagnostic(JSON.stringify(stats));
    } catch (error) {
      console.error(
        `fault model (${policy}) failed with seed ${random.seed}: replay with BLOCKSNAP_SEED=${random.seed}`,
      );
      throw error;
    }
  });
}

async function runFaultModel(random: Prng, rounds: number, policy: OnCowError) {
  const storageFaults: FaultDevice[] = [];
  const engine = new Engine({
    storageStage: (device) => {
      const stage = new FaultDevice(device, {
        seed: random.int(0, 2 ** 31),
        rules: [
          { operations: ["write"], errno: "EIO", probability: 0.03, tornFraction: random.pick([0, 0.5]) },
          { operations: ["write"], errno: "ENOSPC", probability: 0.01 },
          { operations: ["read"], errno: "EIO", probability: 0.03 },
        ],
      });
      storageFaults.push(stage);
      return stage;
    },
  });
  const sizeBytes = 1024 * KiB + 3 * 512;
  const backendFaults = new FaultDevice(new MemoryBackend(sizeBytes), {
    seed: random.int(0, 2 ** 31),
    rules: [
      { operations: ["read"], errno: "EIO", probability: 0.03 },
      { operations: ["write", "writeZeroes"], errno: "EIO", probability: 0.03 },
    ],
  });
  await engine.addDevice({ name: "d0", backendPath: "memory:", backend: backendFaults, sizeBytes });
  const origin = new ByteModel(sizeBytes);
  const originDevice: BlockDevice = engine.findExport("d0")!.device;
  const stats = {
    originWrites: 0,
    originWritesFailed: 0,
    imageReads: 0,
    imageReadsFailed: 0,
    imageWritesFailed: 0,
    snapshots: 0,
    corrupted: 0,
    storageFaults: 0,
    backendFaults: 0,
  };
  let snapshot: { id: string; image: ByteModel; device: BlockDevice } | null = null;

  const randomRange = (): [number, number] => {
    const granule = random.pick([512, 4096, 64 * KiB]);
    const lengthBytes = Math.min(granule * random.int(1, 6), sizeBytes);
    const offsetBytes = random.int(0, Math.floor((sizeBytes - lengthBytes) / 512)) * 512;
    return [offsetBytes, lengthBytes];
  };
  const isCorrupted = (id: string) => engine.snapshotInfo(id).state === "corrupted";

  for (let round = 0; round < rounds; round++) {
    const choice = random.int(0, 99);
    if (snapshot === null || choice < 3) {
      if (snapshot !== null) {
        if (isCorrupted(snapshot.id)) stats.corrupted++;
        await engine.destroySnapshot(snapshot.id);
      }
      const created = await engine.createSnapshot({
        storage: "memory:",
        limitBytes: 64 * 1024 * KiB,
        devices: ["d0"],
        chunkSizeBytes: random.pick([4 * KiB, 64 * KiB]),
        onCowError: policy,
      });
      await engine.takeSnapshot(created.id);
      const image = ByteModel.copyOf(origin);
      snapshot = { id: created.id, image, device: engine.findExport(`d0@${created.id}`)!.device };
      stats.snapshots++;
      continue;
    }
    const [offsetBytes, lengthBytes] = randomRange();
    if (choice < 45) {
      // Origin write.
      const data = random.bytes(lengthBytes);
      const backendWritesBefore = backendFaults.firedCounts.get("write") ?? 0;
      const wasCorrupted = isCorrupted(snapshot.id);
      stats.originWrites++;
      try {
        await originDevice.write(offsetBytes, data);
        origin.write(offsetBytes, data);
      } catch (error) {
        const errno = errnoOf(error);
        stats.originWritesFailed++;
        const backendFailed = (backendFaults.firedCounts.get("write") ?? 0) > backendWritesBefore;
        if (policy === "break-snapshot") {
          assert.ok(backendFailed, `break-snapshot: only the origin's own fault fails its write (${errno})`);
        }
        assert.ok(["EIO", "ENOSPC"].includes(errno), `an injected errno: ${errno}`);
        // Faults fire before the backend write: the origin kept its bytes.
      }
      if (policy === "fail-origin-write" && !wasCorrupted) {
        assert.ok(
          !isCorrupted(snapshot.id),
          "fail-origin-write: an origin write never corrupts the snapshot",
        );
      }
    } else if (choice < 60) {
      // Origin read.
      const target = new Uint8Array(lengthBytes);
      try {
        await originDevice.read(offsetBytes, target);
        const at: number = origin.firstMismatch(offsetBytes, target);
        assert.equal(at, -1, `origin byte ${at} is wrong`);
      } catch (error) {
        assert.equal(errnoOf(error), "EIO");
      }
    } else if (choice < 90) {
      // Image read.
      const target = new Uint8Array(lengthBytes);
      const corruptedBefore = isCorrupted(snapshot.id);
      stats.imageReads++;
      try {
        await snapshot.device.read(offsetBytes, target);
        assert.ok(!corruptedBefore, "a corrupted snapshot's image never answers a read");
        const at: number = snapshot.image.firstMismatch(offsetBytes, target);
        assert.equal(
          at,
          -1,
          `image byte ${at} is wrong (snapshot state ${engine.snapshotInfo(snapshot.id).state})`,
        );
      } catch (error) {
        stats.imageReadsFailed++;
        assert.equal(errnoOf(error), "EIO");
      }
    } else {
      // Image write.
      const data = random.bytes(lengthBytes);
      try {
        await snapshot.device.write(offsetBytes, data);
        snapshot.image.write(offsetBytes, data);
      } catch (error) {
        stats.imageWritesFailed++;
        assert.ok(["EIO", "ENOSPC"].includes(errnoOf(error)));
        snapshot.image.forget(offsetBytes, lengthBytes);
      }
    }
  }
  if (snapshot !== null) await engine.destroySnapshot(snapshot.id);
  await engine.close();
  stats.storageFaults = storageFaults.reduce((sum, device) => sum + device.firedTotal, 0);
  stats.backendFaults = backendFaults.firedTotal;
  // The run must have exercised what it claims to test.
  assert.ok(
    stats.storageFaults > 0 && stats.backendFaults > 0,
    `faults were injected: ${JSON.stringify(stats)}`,
  );
  assert.ok(stats.originWritesFailed > 0 && stats.imageReadsFailed > 0, JSON.stringify(stats));
  if (policy === "break-snapshot")
    assert.ok(stats.corrupted > 0, `some snapshot was corrupted: ${JSON.stringify(stats)}`);
  return stats;
}

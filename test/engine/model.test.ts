/**
 * Seeded randomized model test of the whole engine (docs/design/architecture.md, "How it is tested"): several devices, thousands of
 * interleaved and concurrent operations — origin writes, zeroes and trims, image reads and writes,
 * mark-dirty, takes, bursts of takes past the 255-take CBT wrap, destroys — checked against plain
 * Uint8Array models. Every image read must be byte-exact, origins exact, CBT maps and counters equal.
 *
 * Operations in one round run concurrently on backends that yield before every access, so they
 * interleave for real. A round never holds two operations whose result depends on their order
 * (overlapping origin modifications, or an image write overlapping another image access); everything
 * else — notably origin writes racing image reads and writes of the same chunks — is allowed.
 * Replay a failure with BLOCKSNAP_SEED=<seed printed on failure>.
 */
import assert from "node:assert/strict";
import { test } from "node:test";
import { MemoryBackend } from "../../src/backends/memory-backend.js";
import type { BlockDevice } from "../../src/block/device.js";
import { Engine } from "../../src/engine/engine.js";
import { CbtModel } from "../helpers/cbt-model.js";
import { Prng } from "../helpers/prng.js";

const KiB = 1024;

interface DeviceModel {
  readonly name: string;
  readonly sizeBytes: number;
  readonly origin: Uint8Array;
  readonly cbt: CbtModel;
  lastGenerationId: string;
  seenGeneration: number;
  snapshotId: string | null;
}

interface SnapshotModel {
  readonly id: string;
  readonly devices: string[];
  readonly images: Map<string, Uint8Array>;
  taken: boolean;
}

type Range = [start: number, end: number];

class RoundClaims {
  private readonly claims = new Map<string, Range[]>();

  /** Claims [start, end) on `key` unless it overlaps an existing claim there. */
  tryClaim(key: string, start: number, end: number): boolean {
    const ranges = this.claims.get(key) ?? [];
    if (ranges.some(([s, e]) => start < e && s < end)) return false;
    ranges.push([start, end]);
    this.claims.set(key, ranges);
    return true;
  }

  has(key: string): boolean {
    return this.claims.has(key);
  }
}

test("engine matches a plain model under thousands of random concurrent operations", async (t) => {
  const random = Prng.fromEnvironment();
  const roundsCount = Number.parseInt(process.env.BLOCKSNAP_MODEL_ROUNDS ?? "700", 10);
  t.diagnostic(`seed ${random.seed} (replay with BLOCKSNAP_SEED=${random.seed}), ${roundsCount} rounds`);
  try {
    await runModel(random, roundsCount);
  } catch (error) {
    console.error(`model test failed with seed ${random.seed}: replay with BLOCKSNAP_SEED=${random.seed}`);
    throw error;
  }
});

async function runModel(random: Prng, roundsCount: number): Promise<void> {
  const engine = new Engine();
  const devices: DeviceModel[] = [];
  const sizes = [3 * 1024 * KiB + 5 * 512, 2 * 1024 * KiB, 1536 * KiB + 4096 + 1, 700 * KiB];
  const cbtBlockSizes = [16 * KiB, undefined, 4 * KiB, 64 * KiB];
  for (const [index, sizeBytes] of sizes.entries()) {
    const name = `dev${index}`;
    const cbtBlockSizeBytes = cbtBlockSizes[index];
    const backend = new MemoryBackend(sizeBytes, { yieldCount: () => random.int(0, 4) });
    const info = await engine.addDevice({
      name,
      backendPath: "memory:",
      backend,
      sizeBytes,
      cbtBlockSizeBytes,
    });
    devices.push({
      name,
      sizeBytes,
      origin: new Uint8Array(sizeBytes),
      cbt: new CbtModel(info.cbt.blockSizeBytes, info.cbt.blockCount),
      lastGenerationId: info.cbt.generationId,
      seenGeneration: 0,
      snapshotId: null,
    });
  }
  const snapshots = new Map<string, SnapshotModel>();
  const stats = { ops: 0, imageReads: 0, imageWrites: 0, takes: 0, destroys: 0, wraps: 0 };

  const originOf = (device: DeviceModel): BlockDevice => engine.findExport(device.name)!.device;
  const imageOf = (device: DeviceModel): BlockDevice =>
    engine.findExport(`${device.name}@${device.snapshotId}`)!.device;
  const takenSnapshotOf = (device: DeviceModel): SnapshotModel | undefined => {
    const snapshot = device.snapshotId ? snapshots.get(device.snapshotId) : undefined;
    return snapshot?.taken ? snapshot : undefined;
  };
  const randomRange = (sizeBytes: number): [number, number] => {
    const granule = random.pick([1, 512, 512, 4096]);
    const lengthBytes = Math.max(
      granule,
      Math.floor(random.int(1, random.pick([4, 40, 200])) * KiB) & ~(granule - 1),
    );
    const clamped = Math.min(lengthBytes, sizeBytes);
    const offsetBytes = Math.floor(random.int(0, sizeBytes - clamped) / granule) * granule;
    return [offsetBytes, Math.min(clamped, sizeBytes - offsetBytes)];
  };

  for (let round = 0; round < roundsCount; round++) {
    const claims = new RoundClaims();
    const operations: Promise<void>[] = [];
    const lifecycle = random.chance(0.12) || (stats.wraps === 0 && round === Math.floor(roundsCount / 2));
    if (lifecycle) {
      // Take, destroy or a burst of takes: alone on their devices, concurrent with writes elsewhere.
      const free = devices.filter((device) => device.snapshotId === null);
      const busy = devices.filter((device) => device.snapshotId !== null);
      if (busy.length > 0 && (free.length === 0 || random.chance(0.45))) {
        const victim = random.pick(busy);
        const snapshot = snapshots.get(victim.snapshotId!)!;
        for (const name of snapshot.devices) claims.tryClaim(`lifecycle:${name}`, 0, 1);
        await engine.destroySnapshot(snapshot.id);
        for (const name of snapshot.devices)
          devices.find((device) => device.name === name)!.snapshotId = null;
        snapshots.delete(snapshot.id);
        stats.destroys++;
      } else if (free.length > 0) {
        const members = free.filter(() => random.chance(0.5));
        if (members.length === 0) members.push(random.pick(free));
        // Halfway through, make sure some device crosses the 255-take wrap.
        const forceWrap = stats.wraps === 0 && round >= roundsCount / 2;
        const burst = forceWrap ? 256 : random.chance(0.15) ? random.int(20, 60) : 1;
        for (let i = 0; i < burst; i++) {
          const chunkSizeBytes = random.pick([4 * KiB, 16 * KiB, 64 * KiB, 256 * KiB]);
          const created = await engine.createSnapshot({
            storage: "memory:",
            limitBytes: 64 * 1024 * KiB,
            chunkSizeBytes,
            growthPortionBytes: Math.max(chunkSizeBytes, 1024 * KiB),
            devices: members.map((device) => device.name),
          });
          await engine.takeSnapshot(created.id);
          stats.takes++;
          const images = new Map<string, Uint8Array>();
          for (const device of members) {
            device.cbt.switchAtTake();
            images.set(device.name, device.origin.slice());
            device.snapshotId = created.id;
          }
          snapshots.set(created.id, {
            id: created.id,
            devices: members.map((d) => d.name),
            images,
            taken: true,
          });
          if (i < burst - 1) {
            await engine.destroySnapshot(created.id);
            for (const device of members) device.snapshotId = null;
            snapshots.delete(created.id);
          }
        }
        for (const device of members) {
          claims.tryClaim(`lifecycle:${device.name}`, 0, 1);
          checkGeneration(engine, device, stats);
        }
      }
    }
    const operationsCount = random.int(1, 8);
    for (let i = 0; i < operationsCount; i++) {
      const device = random.pick(devices);
      if (claims.has(`lifecycle:${device.name}`)) continue;
      const snapshot = takenSnapshotOf(device);
      const [offsetBytes, lengthBytes] = randomRange(device.sizeBytes);
      const endBytes = offsetBytes + lengthBytes;
      const kind = random.pick([
        "write",
        "write",
        "zero",
        "trim",
        "imageRead",
        "imageRead",
        "imageWrite",
        "dirty",
      ]);
      stats.ops++;
      if (kind === "write" || kind === "zero" || kind === "trim") {
        if (!claims.tryClaim(`origin:${device.name}`, offsetBytes, endBytes)) continue;
        device.cbt.set(offsetBytes, lengthBytes);
        const origin = originOf(device);
        if (kind === "write") {
          const data = random.bytes(lengthBytes);
          device.origin.set(data, offsetBytes);
          operations.push(origin.write(offsetBytes, data));
        } else {
          device.origin.fill(0, offsetBytes, endBytes);
          operations.push(
            kind === "zero"
              ? origin.writeZeroes(offsetBytes, lengthBytes)
              : origin.trim(offsetBytes, lengthBytes),
          );
        }
      } else if (kind === "dirty") {
        await engine.cbtMarkDirty(device.name, [{ offsetBytes, lengthBytes }]);
        device.cbt.setBoth(offsetBytes, lengthBytes);
      } else if (snapshot && kind === "imageRead") {
        if (!claims.tryClaim(`imageRead:${device.name}`, offsetBytes, endBytes)) continue;
        if (!claims.tryClaim(`imageWriteGuard:${device.name}`, offsetBytes, endBytes)) continue;
        const expected = snapshot.images.get(device.name)!.slice(offsetBytes, endBytes);
        const target = new Uint8Array(lengthBytes);
        const image = imageOf(device);
        stats.imageReads++;
        operations.push(
          image.read(offsetBytes, target).then(() => {
            assertBytesEqual(target, expected, `image read ${device.name} ${offsetBytes}+${lengthBytes}`);
          }),
        );
      } else if (snapshot && kind === "imageWrite") {
        if (!claims.tryClaim(`imageWriteGuard:${device.name}`, offsetBytes, endBytes)) continue;
        const data = random.bytes(lengthBytes);
        snapshot.images.get(device.name)!.set(data, offsetBytes);
        device.cbt.setBoth(offsetBytes, lengthBytes);
        stats.imageWrites++;
        const image = imageOf(device);
        operations.push(
          random.chance(0.2) && data.every((byte) => byte === 0)
            ? image.writeZeroes(offsetBytes, lengthBytes)
            : image.write(offsetBytes, data),
        );
      }
    }
    await Promise.all(operations);
    const full = round % 25 === 24 || round === roundsCount - 1;
    for (const device of devices) await checkDevice(engine, device, takenSnapshotOf(device), full, random);
  }
  assert.ok(
    stats.wraps >= 1,
    `the run must cross the 255-take CBT wrap at least once: ${JSON.stringify(stats)}`,
  );
  assert.ok(
    stats.imageReads > 100 && stats.imageWrites > 50,
    `too few image operations: ${JSON.stringify(stats)}`,
  );
  await engine.close();
}

function checkGeneration(engine: Engine, device: DeviceModel, stats: { wraps: number }): void {
  const info = engine.cbtInfo(device.name);
  // A new generation id appears exactly when the model wrapped since the last check.
  if (device.cbt.generation !== device.seenGeneration) {
    assert.notEqual(
      info.generationId,
      device.lastGenerationId,
      `${device.name}: wrap did not renew the generation`,
    );
    stats.wraps++;
  } else {
    assert.equal(
      info.generationId,
      device.lastGenerationId,
      `${device.name}: generation changed without a wrap`,
    );
  }
  device.seenGeneration = device.cbt.generation;
  device.lastGenerationId = info.generationId;
}

async function checkDevice(
  engine: Engine,
  device: DeviceModel,
  snapshot: SnapshotModel | undefined,
  full: boolean,
  random: Prng,
): Promise<void> {
  const info = engine.cbtInfo(device.name);
  assert.equal(info.changesNumber, device.cbt.previous, `${device.name}: changesNumber`);
  assertBytesEqual(engine.cbtRead(device.name), device.cbt.readMap, `${device.name}: CBT read map`);
  assertBytesEqual(
    engine.tracker(device.name).cbt.writeMapCopy(),
    device.cbt.writeMap,
    `${device.name}: write map`,
  );
  const [offsetBytes, lengthBytes] = full ? [0, device.sizeBytes] : sampleRange(random, device.sizeBytes);
  const origin = new Uint8Array(lengthBytes);
  await engine.findExport(device.name)!.device.read(offsetBytes, origin);
  assertBytesEqual(
    origin,
    device.origin.subarray(offsetBytes, offsetBytes + lengthBytes),
    `${device.name}: origin`,
  );
  if (snapshot) {
    const image = new Uint8Array(lengthBytes);
    await engine.findExport(`${device.name}@${snapshot.id}`)!.device.read(offsetBytes, image);
    const expected = snapshot.images.get(device.name)!.subarray(offsetBytes, offsetBytes + lengthBytes);
    assertBytesEqual(image, expected, `${device.name}: image`);
  }
}

function sampleRange(random: Prng, sizeBytes: number): [number, number] {
  const lengthBytes = Math.min(sizeBytes, 256 * KiB);
  const offsetBytes = random.int(0, sizeBytes - lengthBytes);
  return [offsetBytes, lengthBytes];
}

function assertBytesEqual(actual: Uint8Array, expected: Uint8Array, what: string): void {
  assert.equal(actual.byteLength, expected.byteLength, `${what}: length`);
  if (Buffer.from(actual.buffer, actual.byteOffset, actual.byteLength).equals(expected)) return;
  const index = actual.findIndex((byte, i) => byte !== expected[i]);
  assert.fail(
    `${what}: first difference at byte ${index}: got ${actual[index]}, expected ${expected[index]}`,
  );
}

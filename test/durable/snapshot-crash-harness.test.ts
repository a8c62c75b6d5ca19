/**
 * Crash states of a kept snapshot (durable state, item 3), in the style of CrashMonkey/ALICE: the real
 * DiffArea, DiffStorage and chunk log (ChunkLogWriter) run a seeded workload of concurrent origin writes
 * (each preserving its chunks first, as the tracker does), while every storage write and every chunk-log
 * write is recorded as issued and as completed, each completing a random number of turns later. At random
 * moments the harness builds what a kill -9 leaves: every completed write, plus a random subset of the
 * writes still in flight, some of them torn. Recovery decodes the chunk log and reads each chunk of the
 * image from the storage when a record names it, otherwise from the origin (what a restored DiffArea does).
 * The check: never a wrong image byte. Hundreds of crash points per run, seeded; the seed is printed.
 */
import assert from "node:assert/strict";
import { test } from "node:test";
import { MemoryBackend } from "../../src/backends/memory-backend.js";
import { PassThroughDevice } from "../../src/block/pass-through-device.js";
import { DiffArea } from "../../src/cow/diff-area.js";
import { ChunkLogWriter, decodeChunkLog } from "../../src/persist/chunk-log.js";
import type { PersistFile } from "../../src/persist/persist-file.js";
import { DiffStorage, decodeLocationCode } from "../../src/storage/diff-storage.js";
import { Prng } from "../helpers/prng.js";

const chunkBytes = 16 * 1024;
const deviceBytes = 64 * chunkBytes;
const storageBytes = 4 * 1024 * 1024;
const crashPointsWanted = 300;

interface RecordedWrite {
  readonly offsetBytes: number;
  readonly data: Uint8Array;
  done: boolean;
}

/** Writes that complete a random number of event-loop turns after they are issued, all recorded. */
class Recorder {
  readonly writes: RecordedWrite[] = [];
  private readonly random: Prng;

  constructor(random: Prng) {
    this.random = random;
  }

  async record(offsetBytes: number, data: Uint8Array, apply: () => Promise<void>): Promise<void> {
    const write: RecordedWrite = { offsetBytes, data: data.slice(), done: false };
    this.writes.push(write);
    for (let turns = this.random.int(0, 3); turns > 0; turns--) await new Promise((r) => setImmediate(r));
    await apply();
    write.done = true;
  }

  /** What a kill -9 leaves: completed writes, and some in-flight ones (whole or torn). */
  crashState(sizeBytes: number, random: Prng): Uint8Array {
    const bytes = new Uint8Array(sizeBytes);
    for (const write of this.writes) {
      if (write.done) bytes.set(write.data, write.offsetBytes);
      else if (random.chance(0.5)) {
        const keptBytes = random.chance(0.5) ? write.data.byteLength : random.int(0, write.data.byteLength);
        bytes.set(write.data.subarray(0, keptBytes), write.offsetBytes);
      }
    }
    return bytes;
  }
}

class RecordingStorageDevice extends PassThroughDevice {
  readonly recorder: Recorder;

  constructor(inner: MemoryBackend, recorder: Recorder) {
    super(inner);
    this.recorder = recorder;
  }

  override write(offsetBytes: number, source: Uint8Array): Promise<void> {
    return this.recorder.record(offsetBytes, source, () => this.inner.write(offsetBytes, source));
  }
}

class RecordingLogFile implements PersistFile {
  readonly recorder: Recorder;
  lengthBytes = 0;

  constructor(recorder: Recorder) {
    this.recorder = recorder;
  }

  write(positionBytes: number, data: Uint8Array): Promise<void> {
    this.lengthBytes = Math.max(this.lengthBytes, positionBytes + data.byteLength);
    return this.recorder.record(positionBytes, data, async () => {});
  }

  async sync(): Promise<void> {}

  async readAll(): Promise<Uint8Array> {
    throw new Error("the harness builds crash states itself");
  }

  async close(): Promise<void> {}
}

/** One run: a taken snapshot under concurrent origin writes; a crash state checked every few writes. */
async function runOnce(random: Prng): Promise<number> {
  const origin = new MemoryBackend(deviceBytes);
  const reference = new Uint8Array(deviceBytes);
  for (let index = 0; index < deviceBytes; index++) reference[index] = (index * 7 + 3) & 0xff;
  await origin.write(0, reference);

  const storageRecorder = new Recorder(random);
  const logRecorder = new Recorder(random);
  const logFile = new RecordingLogFile(logRecorder);
  const log = await ChunkLogWriter.open(logFile, 0, "harness-boot");
  const storage = new DiffStorage({
    path: "memory:",
    limitBytes: storageBytes,
    growthPortionBytes: storageBytes,
    areaStage: (device) => new RecordingStorageDevice(device as MemoryBackend, storageRecorder),
  });
  const diffArea = new DiffArea({
    deviceName: "d0",
    origin,
    sizeBytes: deviceBytes,
    chunkSizeBytes: chunkBytes,
    storage,
    onCowError: "break-snapshot",
    onCorrupted: (errno) => assert.fail(`the harness never fails a copy, got ${errno}`),
    onStored: (chunkIndex, locationCode) => log.stored(0, chunkIndex, locationCode),
  });

  let crashes = 0;
  const checkCrash = async () => {
    const originNow = new Uint8Array(deviceBytes);
    await origin.read(0, originNow);
    const storageNow = storageRecorder.crashState(storageBytes, random);
    const decoded = decodeChunkLog(logRecorder.crashState(logFile.lengthBytes, random));
    const recorded = decoded.chunks.get(0) ?? new Map<number, number>();
    for (let chunkIndex = 0; chunkIndex < deviceBytes / chunkBytes; chunkIndex++) {
      const code = recorded.get(chunkIndex);
      const start = chunkIndex * chunkBytes;
      const image =
        code === undefined
          ? originNow.subarray(start, start + chunkBytes)
          : storageNow.subarray(
              decodeLocationCode(code).offsetBytes,
              decodeLocationCode(code).offsetBytes + chunkBytes,
            );
      if (!image.every((byte, index) => byte === reference[start + index])) {
        assert.fail(
          `crash ${crashes}: chunk ${chunkIndex} of the image is wrong (${code === undefined ? "read from the origin" : `stored at ${code}`})`,
        );
      }
    }
    crashes++;
  };

  const writer = async (writes: number) => {
    for (let count = 0; count < writes; count++) {
      const offsetBytes = random.int(0, deviceBytes / 512 - 1) * 512;
      const lengthBytes = Math.min(random.int(1, 48) * 512, deviceBytes - offsetBytes);
      await diffArea.preserveForOriginWrite(offsetBytes, lengthBytes);
      await origin.write(offsetBytes, new Uint8Array(lengthBytes).fill(random.int(0, 255)));
    }
  };
  const checker = async () => {
    for (let point = 0; point < 40; point++) {
      for (let turns = random.int(0, 4); turns > 0; turns--) await new Promise((r) => setImmediate(r));
      await checkCrash();
    }
  };
  await Promise.all([writer(30), writer(30), writer(30), checker()]);
  await checkCrash();
  await storage.close();
  return crashes;
}

test("kept snapshot: no crash state of the chunk log and storage serves a wrong image byte", async (t) => {
  const random = Prng.fromEnvironment();
  t.diagnostic(`seed ${random.seed} (replay with BLOCKSNAP_SEED=${random.seed})`);
  let crashes = 0;
  while (crashes < crashPointsWanted) crashes += await runOnce(random);
  t.diagnostic(`${crashes} crash states checked`);
  assert.ok(crashes >= crashPointsWanted);
});

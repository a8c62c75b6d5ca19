/**
 * Cost of keeping a snapshot across restarts on the copy-before-write path (durable state, item 3): the
 * same first-touch workload with the snapshot keeper (a 32-byte chunk record written through the state
 * directory's writer thread before each origin write that preserved a chunk goes on) and with a keeper that
 * records nothing (same named storage file, no chunk records: the cost of the records alone). File origin of 64 MiB, directory storage, 64 KiB chunks; one 4 KiB write at
 * the start of every chunk, issued one at a time (QD1) and 16 at a time (QD16). Rounds alternate between
 * the two engines; medians of 5 rounds.
 */
import { mkdirSync } from "node:fs";
import { join } from "node:path";
import { SnapshotKeeper } from "../../src/daemon/snapshot-keeper.js";
import { Engine } from "../../src/engine/engine.js";
import type { SnapshotPersistence } from "../../src/engine/engine-types.js";
import { silentLogger } from "../../src/util/logger.js";
import {
  fixed,
  KiB,
  MiB,
  markdownTable,
  median,
  patternBytes,
  printSection,
  scratchDir,
  timeMs,
} from "../core/bench-util.js";

const deviceBytes = 64 * MiB;
const chunkSizeBytes = 64 * KiB;
const rounds = 5;
const writes = deviceBytes / chunkSizeBytes;

/** A keeper that keeps nothing: the engine behaves as with persistence (named storage files), minus records. */
const recordsNothing: SnapshotPersistence = {
  save: async () => {},
  chunkStored: async () => {},
  forget: async () => {},
  closed: async () => {},
};

async function firstTouch(kept: boolean, queueDepth: number, directory: string): Promise<number> {
  const stateDir = join(directory, kept ? "state-kept" : "state-plain");
  mkdirSync(stateDir, { recursive: true });
  const engine = new Engine({
    persistence: kept ? new SnapshotKeeper(stateDir, silentLogger) : recordsNothing,
  });
  try {
    await engine.addDevice({
      name: "d0",
      backendPath: join(directory, "origin.img"),
      sizeBytes: deviceBytes,
    });
    const origin = engine.findExport("d0")!.device;
    const snapshot = await engine.createSnapshot({
      storage: directory,
      limitBytes: 2 * deviceBytes,
      devices: ["d0"],
      chunkSizeBytes,
    });
    await engine.takeSnapshot(snapshot.id, { noFreeze: true });
    const source = patternBytes(4 * KiB, 11);
    let next = 0;
    const lane = async () => {
      while (next < writes) {
        const chunkIndex = next++;
        await origin.write(chunkIndex * chunkSizeBytes, source);
      }
    };
    const elapsedMs = await timeMs(async () => {
      await Promise.all(Array.from({ length: queueDepth }, lane));
    });
    await engine.destroySnapshot(snapshot.id);
    return elapsedMs;
  } finally {
    await engine.close();
  }
}

const scratch = scratchDir("chunk-log-cost");
try {
  const rows: string[][] = [];
  for (const queueDepth of [1, 16]) {
    const keptMs: number[] = [];
    const plainMs: number[] = [];
    for (let round = 0; round < rounds; round++) {
      // Which engine goes first alternates, so neither always meets a colder page cache.
      for (const kept of round % 2 === 0 ? [false, true] : [true, false]) {
        const elapsedMs = await firstTouch(kept, queueDepth, scratch.path);
        (kept ? keptMs : plainMs).push(elapsedMs);
      }
    }
    const kept = median(keptMs);
    const plain = median(plainMs);
    rows.push([
      `QD${queueDepth}`,
      fixed((writes / plain) * 1000, 0),
      fixed((writes / kept) * 1000, 0),
      `${fixed(plain / kept, 3)}×`,
    ]);
  }
  printSection(
    [
      "## Chunk records on the copy-before-write path (`node dist/bench/durable/chunk-log-cost.js`)",
      "",
      `${writes} first-touch 4 KiB writes (one per 64 KiB chunk of a 64 MiB file origin, directory storage); median of ${rounds} rounds, the engine that goes first alternating.`,
      "",
      markdownTable(["queue depth", "writes/s, no records", "writes/s, kept snapshot", "kept / none"], rows),
    ].join("\n"),
  );
} finally {
  scratch.remove();
}

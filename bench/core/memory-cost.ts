/**
 * Memory per TiB tracked and per touched chunk (issue #2, measurement 4; goal: 2 bytes per CBT block plus
 * a small constant per touched chunk).
 *
 * A. CBT: adds a 1 TiB device (a sparse file made by ftruncate, or a sparse `memory:` device) and reads
 *    process.memoryUsage() before and after, with global.gc() in between; expected = 2 × blockCount from
 *    cbtInfo (write map + read map). Then the cost of taking a snapshot of it (DiffArea, image, storage).
 * B. Chunk map: takes a snapshot with 4 KiB chunks of a file device and touches 100,000 chunks with
 *    4 KiB origin writes (each preserves one chunk); the heap growth per touched chunk is the DiffArea's
 *    per-chunk cost. Storage is a file in a temp dir (its data is not in the process) or `memory:` (its
 *    data is, as ArrayBuffers). Also times snapshotInfo(), which reads a counter.
 * C. A model of the chunk-map entry (the same Map<number, number> shape: one location code per chunk)
 *    with storage offsets below and above 2 GiB: integers ≥ 2^31 are not Smis on x64 and are stored as
 *    heap numbers, and the engine's real run (B) stays below 2 GiB of storage.
 *
 * Needs --expose-gc; run without it, the script re-runs itself with it.
 */
import { spawnSync } from "node:child_process";
import { performance } from "node:perf_hooks";
import { fileURLToPath } from "node:url";
import { Engine } from "../../src/engine/engine.js";
import {
  fixed,
  formatBytes,
  GiB,
  KiB,
  MiB,
  markdownTable,
  median,
  patternBytes,
  printSection,
  progress,
  scratchDir,
  TiB,
} from "./bench-util.js";

const touchedChunkCheckpoints = [25_000, 50_000, 100_000];
const warmUpChunkCount = 2_000;
const chunkSizeBytes = 4 * KiB;
const infoCallCount = 21;

if (typeof globalThis.gc !== "function") {
  const child = spawnSync(
    process.execPath,
    ["--expose-gc", ...process.execArgv, fileURLToPath(import.meta.url), ...process.argv.slice(2)],
    { stdio: "inherit" },
  );
  process.exit(child.status ?? 1);
}
const collectGarbage: () => void = globalThis.gc;

interface MemorySample {
  readonly heapUsedBytes: number;
  readonly arrayBuffersBytes: number;
  readonly rssBytes: number;
}

function sample(): MemorySample {
  for (let i = 0; i < 3; i++) collectGarbage();
  const usage = process.memoryUsage();
  return { heapUsedBytes: usage.heapUsed, arrayBuffersBytes: usage.arrayBuffers, rssBytes: usage.rss };
}

function delta(after: MemorySample, before: MemorySample): MemorySample {
  return {
    heapUsedBytes: after.heapUsedBytes - before.heapUsedBytes,
    arrayBuffersBytes: after.arrayBuffersBytes - before.arrayBuffersBytes,
    rssBytes: after.rssBytes - before.rssBytes,
  };
}

function signedBytes(bytes: number): string {
  return bytes < 0 ? `−${formatBytes(-bytes)}` : formatBytes(bytes);
}

// ---- A. CBT per TiB ----

interface CbtCase {
  readonly label: string;
  readonly backend: "file" | "memory";
  readonly cbtBlockSizeBytes?: number;
}

const cbtCases: readonly CbtCase[] = [
  { label: "1 TiB sparse file, default CBT block", backend: "file" },
  { label: "1 TiB `memory:` device, default CBT block", backend: "memory" },
  { label: "1 TiB sparse file, CBT block 64 KiB (override)", backend: "file", cbtBlockSizeBytes: 64 * KiB },
];

async function measureCbt(): Promise<string> {
  const rows: string[][] = [];
  const takeRows: string[][] = [];
  for (const cbtCase of cbtCases) {
    progress(`memory-cost: ${cbtCase.label}`);
    const scratch = scratchDir("mem-cbt");
    const engine = new Engine();
    try {
      const before = sample();
      const info = await engine.addDevice({
        name: "big",
        backendPath: cbtCase.backend === "memory" ? "memory:" : `${scratch.path}/big.img`,
        sizeBytes: TiB,
        ...(cbtCase.cbtBlockSizeBytes === undefined ? {} : { cbtBlockSizeBytes: cbtCase.cbtBlockSizeBytes }),
      });
      const added = delta(sample(), before);
      const cbt = engine.cbtInfo("big");
      const expectedBytes = 2 * cbt.blockCount;
      rows.push([
        cbtCase.label,
        formatBytes(cbt.blockSizeBytes),
        String(cbt.blockCount),
        formatBytes(expectedBytes),
        fixed(expectedBytes / (info.sizeBytes / TiB), 0),
        signedBytes(added.arrayBuffersBytes),
        signedBytes(added.heapUsedBytes),
        fixed((added.arrayBuffersBytes + added.heapUsedBytes) / cbt.blockCount, 3),
      ]);
      const beforeTake = sample();
      const snapshot = await engine.createSnapshot({
        storage: scratch.path,
        limitBytes: GiB,
        devices: ["big"],
      });
      const taken = await engine.takeSnapshot(snapshot.id);
      const afterTake = delta(sample(), beforeTake);
      takeRows.push([
        cbtCase.label,
        signedBytes(afterTake.heapUsedBytes),
        signedBytes(afterTake.arrayBuffersBytes),
        signedBytes(afterTake.rssBytes),
        fixed(taken.takeStallMs ?? Number.NaN, 2),
      ]);
      await engine.destroySnapshot(snapshot.id);
    } finally {
      await engine.close();
      scratch.remove();
    }
  }
  return [
    "#### 4a. CBT memory per TiB tracked",
    "",
    "Measured: growth of `process.memoryUsage()` (after `global.gc()`) when the device is added. " +
      "Expected: 2 bytes per CBT block (write map + read map) from `cbtInfo`.",
    "",
    markdownTable(
      [
        "device",
        "CBT block",
        "blocks",
        "expected (2 B/block)",
        "expected bytes per TiB",
        "measured arrayBuffers",
        "measured heapUsed",
        "measured B/block",
      ],
      rows,
    ),
    "Creating + taking a snapshot of that device (empty chunk map, file storage in a temp dir): growth " +
      "after `global.gc()`; rss grows because the take writes the read map for the first time.",
    "",
    markdownTable(["device", "heapUsed", "arrayBuffers", "rss", "takeStallMs"], takeRows),
  ].join("\n");
}

// ---- B. per touched chunk ----

interface ChunkRow {
  readonly storage: string;
  readonly touchedCount: number;
  readonly heapPerChunkBytes: number;
  readonly arrayBuffersPerChunkBytes: number;
}

async function measureChunks(storageKind: "file" | "memory"): Promise<{ rows: ChunkRow[]; infoUs: number }> {
  progress(`memory-cost: chunk map, ${storageKind} storage`);
  const scratch = scratchDir("mem-chunks");
  const engine = new Engine();
  try {
    const lastCheckpoint = touchedChunkCheckpoints[touchedChunkCheckpoints.length - 1]!;
    const deviceSizeBytes = (warmUpChunkCount + lastCheckpoint) * chunkSizeBytes;
    await engine.addDevice({
      name: "disk0",
      backendPath: `${scratch.path}/origin.img`,
      sizeBytes: deviceSizeBytes,
    });
    const origin = engine.findExport("disk0")!.device;
    const snapshot = await engine.createSnapshot({
      storage: storageKind === "memory" ? "memory:" : scratch.path,
      limitBytes: deviceSizeBytes + 256 * MiB,
      devices: ["disk0"],
      chunkSizeBytes,
    });
    await engine.takeSnapshot(snapshot.id);
    const source = patternBytes(4 * KiB, 5);
    let chunkIndex = 0;
    const touchUpTo = async (count: number) => {
      for (; chunkIndex < count; chunkIndex++) await origin.write(chunkIndex * chunkSizeBytes, source);
    };
    // Warm-up: JIT the write path and let the storage and the map grow past their first steps.
    await touchUpTo(warmUpChunkCount);
    const start = sample();
    const rows: ChunkRow[] = [];
    for (const checkpoint of touchedChunkCheckpoints) {
      await touchUpTo(warmUpChunkCount + checkpoint);
      const grown = delta(sample(), start);
      rows.push({
        storage: storageKind,
        touchedCount: checkpoint,
        heapPerChunkBytes: grown.heapUsedBytes / checkpoint,
        arrayBuffersPerChunkBytes: grown.arrayBuffersBytes / checkpoint,
      });
    }
    const stored = engine.snapshotInfo(snapshot.id).devices[0]?.chunksStored;
    if (stored !== warmUpChunkCount + lastCheckpoint) {
      throw new Error(`expected ${warmUpChunkCount + lastCheckpoint} chunks stored, got ${stored}`);
    }
    const infoTimesUs: number[] = [];
    for (let i = 0; i < infoCallCount; i++) {
      const startMs = performance.now();
      engine.snapshotInfo(snapshot.id);
      infoTimesUs.push((performance.now() - startMs) * 1000);
    }
    await engine.destroySnapshot(snapshot.id);
    return { rows, infoUs: median(infoTimesUs) };
  } finally {
    await engine.close();
    scratch.remove();
  }
}

// ---- C. model of one chunk-map entry, below and above 2 GiB of storage ----

function modelEntryBytes(firstOffsetBytes: number, entryCount: number): number {
  const before = sample();
  const chunks = new Map<number, number>();
  for (let i = 0; i < entryCount; i++) {
    chunks.set(i, firstOffsetBytes + i * 4 * KiB);
  }
  const grown = delta(sample(), before);
  if (chunks.size !== entryCount) throw new Error("model map lost entries");
  return grown.heapUsedBytes / entryCount;
}

const cbtSection = await measureCbt();
const fileChunks = await measureChunks("file");
const memoryChunks = await measureChunks("memory");
progress("memory-cost: chunk-map model");
const modelCount = 100_000;
// 100,000 regions of 4 KiB: the low run stays below 2^31, the high one starts at 4 GiB.
const modelLow = modelEntryBytes(4 * KiB, modelCount);
const modelHigh = modelEntryBytes(4 * GiB, modelCount);

const chunkRows = [...fileChunks.rows, ...memoryChunks.rows].map((row) => [
  row.storage,
  String(row.touchedCount),
  fixed(row.heapPerChunkBytes, 1),
  fixed(row.arrayBuffersPerChunkBytes, 1),
]);
const lastChunks = touchedChunkCheckpoints[touchedChunkCheckpoints.length - 1]! + warmUpChunkCount;

printSection(
  [
    "### 4. Memory per TiB tracked and per touched chunk",
    "",
    cbtSection,
    "#### 4b. Bytes per touched chunk (DiffArea chunk map)",
    "",
    `Snapshot with ${chunkSizeBytes / KiB} KiB chunks of a sparse file device; each 4 KiB origin write ` +
      "preserves one fresh chunk. Growth after `global.gc()` divided by the chunks touched (after a " +
      `${warmUpChunkCount}-chunk warm-up). With \`memory:\` storage the chunk data itself is in arrayBuffers ` +
      "(4096 B/chunk expected).",
    "",
    markdownTable(["storage", "chunks touched", "heapUsed B/chunk", "arrayBuffers B/chunk"], chunkRows),
    `\`snapshotInfo()\` with ${lastChunks} chunks stored: median ${fixed(fileChunks.infoUs, 0)} µs (file ` +
      `storage), ${fixed(memoryChunks.infoUs, 0)} µs (memory storage): the stored-chunk count is kept as a ` +
      "counter, so this does not grow with the chunk map.",
    "",
    `Model of one entry (\`Map<number, number>\`, ${modelCount} entries): storage offsets ` +
      `< 2 GiB: ${fixed(modelLow, 1)} B/entry; offsets ≥ 4 GiB (not Smis on x64): ${fixed(modelHigh, 1)} ` +
      "B/entry.",
    "",
  ].join("\n"),
);

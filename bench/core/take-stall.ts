/**
 * Take stall under concurrent writes (issue #2, measurement 3; goal < 10 ms).
 *
 * 1 or 16 devices; per device `writersPerDevice` writer loops issue 4 KiB writes at random offsets inside
 * the first `writeSpanBytes` of the device, continuously, through the origin exports. Meanwhile the loop
 * below does, `takeCount` times: create a snapshot of all devices, let the writers run, take it, let the
 * writers copy-before-write into it, destroy it. Reported per take:
 *   takeStallMs        - what the engine reports (first hold .. release: drain + CBT switch + attach);
 *   takeSnapshot() ms  - wall time of the whole call;
 *   max write latency  - the slowest 4 KiB write that started while takeSnapshot() ran: held at the gate,
 *                        then released into the new snapshot, so it includes the copy-before-write of its
 *                        chunk and of the other held writes queued before it (the stall a client sees);
 *   GC                 - how many takes overlapped a garbage-collection pause, and the longest such pause.
 *
 * Backends: `memory` (MemoryBackend: every request completes without leaving the microtask queue),
 * `memory+async` (MemoryBackend with yieldCount () => 1: every backend request waits one macrotask, as
 * real asynchronous I/O would, so writes are genuinely in flight when take holds them), `file` (sparse
 * files in a temp dir, synchronous pread/pwrite), and 16 × 1 TiB memory devices (CBT maps of 4 MiB each,
 * which the switch copies under the hold). Writers yield to the event loop every few writes so that timers
 * and the take itself get their turn, as requests arriving on sockets would.
 */

import { PerformanceObserver, performance } from "node:perf_hooks";
import { setImmediate as nextMacrotask, setTimeout as sleep } from "node:timers/promises";
import { MemoryBackend } from "../../src/backends/memory-backend.js";
import { Engine } from "../../src/engine/engine.js";
import {
  fixed,
  KiB,
  MiB,
  markdownTable,
  maximum,
  median,
  patternBytes,
  printSection,
  progress,
  scratchDir,
  seededRandom,
  TiB,
} from "./bench-util.js";

const writeSizeBytes = 4 * KiB;
const writeSpanBytes = 64 * MiB;
const writersPerDevice = 4;
const writesBetweenYields = 8;
const takeCount = 50;
const runBeforeTakeMs = 5;
const runAfterTakeMs = 5;

type BackendKind = "memory" | "memory+async" | "file";

/** Writes that started while takeSnapshot() ran: how many are still running, and the slowest so far. */
interface TakeWindow {
  pendingCount: number;
  maxLatencyMs: number;
}

interface StallCase {
  readonly backend: BackendKind;
  readonly deviceCount: number;
  readonly deviceSizeBytes: number;
}

interface StallResult extends StallCase {
  readonly stallMs: number[];
  readonly takeCallMs: number[];
  readonly maxWriteLatencyMs: number[];
  readonly writesPerSecond: number;
  /** Garbage-collection pause time overlapping each takeSnapshot() call. */
  readonly gcInTakeMs: number[];
}

const cases: readonly StallCase[] = [
  { backend: "memory", deviceCount: 1, deviceSizeBytes: writeSpanBytes },
  { backend: "memory", deviceCount: 16, deviceSizeBytes: writeSpanBytes },
  { backend: "memory+async", deviceCount: 1, deviceSizeBytes: writeSpanBytes },
  { backend: "memory+async", deviceCount: 16, deviceSizeBytes: writeSpanBytes },
  { backend: "file", deviceCount: 1, deviceSizeBytes: writeSpanBytes },
  { backend: "file", deviceCount: 16, deviceSizeBytes: writeSpanBytes },
  { backend: "memory", deviceCount: 16, deviceSizeBytes: TiB },
];

async function measure(stallCase: StallCase): Promise<StallResult> {
  const scratch = scratchDir("stall");
  const engine = new Engine();
  const names = Array.from({ length: stallCase.deviceCount }, (_, i) => `disk${i}`);
  let running = true;
  let writeCount = 0;
  let window: TakeWindow | null = null;
  const writers: Promise<void>[] = [];
  try {
    for (const name of names) {
      if (stallCase.backend === "file") {
        await engine.addDevice({
          name,
          backendPath: `${scratch.path}/${name}.img`,
          sizeBytes: stallCase.deviceSizeBytes,
        });
      } else {
        await engine.addDevice({
          name,
          backendPath: "memory:",
          backend: new MemoryBackend(stallCase.deviceSizeBytes, {
            yieldCount: stallCase.backend === "memory+async" ? () => 1 : undefined,
          }),
        });
      }
    }
    const source = patternBytes(writeSizeBytes, 3);
    const writer = async (name: string, seed: number) => {
      const origin = engine.findExport(name)!.device;
      const random = seededRandom(seed);
      const slotCount = writeSpanBytes / writeSizeBytes;
      let sinceYield = 0;
      while (running) {
        const offsetBytes = Math.floor(random() * slotCount) * writeSizeBytes;
        const observed = window;
        if (observed) observed.pendingCount++;
        const startMs = performance.now();
        await origin.write(offsetBytes, source);
        const latencyMs = performance.now() - startMs;
        if (observed) {
          observed.pendingCount--;
          observed.maxLatencyMs = Math.max(observed.maxLatencyMs, latencyMs);
        }
        writeCount++;
        if (++sinceYield >= writesBetweenYields) {
          sinceYield = 0;
          await nextMacrotask();
        }
      }
    };
    names.forEach((name, i) => {
      for (let w = 0; w < writersPerDevice; w++) writers.push(writer(name, 1 + i * writersPerDevice + w));
    });

    const stallMs: number[] = [];
    const takeCallMs: number[] = [];
    const maxWriteLatencyMs: number[] = [];
    const takeWindows: [number, number][] = [];
    const gcPauses: { startMs: number; durationMs: number }[] = [];
    const gcObserver = new PerformanceObserver((list) => {
      for (const entry of list.getEntries()) {
        gcPauses.push({ startMs: entry.startTime, durationMs: entry.duration });
      }
    });
    gcObserver.observe({ entryTypes: ["gc"] });
    const startMs = performance.now();
    const writesAtStart = writeCount;
    for (let take = 0; take < takeCount; take++) {
      const snapshot = await engine.createSnapshot({
        storage: stallCase.backend === "file" ? scratch.path : "memory:",
        limitBytes: stallCase.deviceCount * writeSpanBytes + 64 * MiB,
        devices: names,
      });
      await sleep(runBeforeTakeMs);
      const observed: TakeWindow = { pendingCount: 0, maxLatencyMs: 0 };
      window = observed;
      const takeStartMs = performance.now();
      const info = await engine.takeSnapshot(snapshot.id);
      const takeEndMs = performance.now();
      window = null;
      takeCallMs.push(takeEndMs - takeStartMs);
      takeWindows.push([takeStartMs, takeEndMs]);
      stallMs.push(info.takeStallMs ?? Number.NaN);
      while (observed.pendingCount > 0) await nextMacrotask();
      maxWriteLatencyMs.push(observed.maxLatencyMs);
      await sleep(runAfterTakeMs);
      await engine.destroySnapshot(snapshot.id);
    }
    const elapsedMs = performance.now() - startMs;
    await nextMacrotask();
    gcObserver.disconnect();
    const gcInTakeMs = takeWindows.map(([fromMs, toMs]) =>
      gcPauses
        .filter((pause) => pause.startMs < toMs && pause.startMs + pause.durationMs > fromMs)
        .reduce((sum, pause) => sum + pause.durationMs, 0),
    );
    return {
      gcInTakeMs,
      ...stallCase,
      stallMs,
      takeCallMs,
      maxWriteLatencyMs,
      writesPerSecond: ((writeCount - writesAtStart) * 1000) / elapsedMs,
    };
  } finally {
    running = false;
    await Promise.allSettled(writers);
    await engine.close();
    scratch.remove();
  }
}

function render(results: readonly StallResult[]): string {
  const rows = results.map((result) => [
    result.backend,
    String(result.deviceCount),
    result.deviceSizeBytes >= TiB
      ? `${result.deviceSizeBytes / TiB} TiB`
      : `${result.deviceSizeBytes / MiB} MiB`,
    String(result.deviceCount * writersPerDevice),
    fixed(result.writesPerSecond, 0),
    fixed(result.stallMs[0] ?? Number.NaN, 3),
    fixed(median(result.stallMs), 3),
    fixed(maximum(result.stallMs), 3),
    fixed(median(result.takeCallMs), 3),
    fixed(maximum(result.takeCallMs), 3),
    fixed(median(result.maxWriteLatencyMs), 3),
    fixed(maximum(result.maxWriteLatencyMs), 3),
    `${result.gcInTakeMs.filter((ms) => ms > 0).length} / ${fixed(maximum(result.gcInTakeMs), 1)}`,
  ]);
  return [
    "### 3. Take stall under concurrent 4 KiB writes (goal < 10 ms)",
    "",
    `${takeCount} takes per row (create, ${runBeforeTakeMs} ms of writes, take, ${runAfterTakeMs} ms of ` +
      `copy-before-write, destroy). ${writersPerDevice} writer loops per device write 4 KiB at random offsets ` +
      `in the first ${writeSpanBytes / MiB} MiB of every device through the origin exports, non-stop. ` +
      "*stall* is the engine's `takeStallMs` (hold → drain → CBT switch → release); *max write latency* is " +
      "the slowest write that started during `takeSnapshot()` (held, then released into the new snapshot: " +
      "includes its own first copy-before-write and that of the writes queued before it). With the " +
      "synchronous backends (`memory`, `file`) a take runs inside one event-loop turn, so no write can start " +
      "during it (latency 0 here); a client's requests wait in the socket for `takeSnapshot()` ms instead. " +
      "`memory+async` backends complete each request one macrotask later, so writes are in flight when take " +
      "holds them. *1st take*: the first take after the devices were added (its CBT read maps are " +
      "touched for the first time under the hold, so it pays the page faults). *GC* columns: takes that overlapped a garbage-collection pause, and the longest pause.",
    "",
    markdownTable(
      [
        "backend",
        "devices",
        "device size",
        "writers",
        "writes/s",
        "1st take stall ms",
        "stall median ms",
        "stall max ms",
        "takeSnapshot() median ms",
        "takeSnapshot() max ms",
        "max write latency median ms",
        "max write latency max ms",
        "takes with GC / max GC ms",
      ],
      rows,
    ),
  ].join("\n");
}

const results: StallResult[] = [];
for (const stallCase of cases) {
  progress(
    `take-stall: ${stallCase.backend}, ${stallCase.deviceCount} device(s) of ${stallCase.deviceSizeBytes} B`,
  );
  results.push(await measure(stallCase));
}
printSection(render(results));

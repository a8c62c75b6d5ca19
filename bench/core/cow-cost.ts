/**
 * Copy-before-write cost on the origin write path (issue #2, measurements 1 and 2).
 *
 * One device per configuration (MemoryBackend with `memory:` storage, or FileBackend on a file in a temp
 * dir with a directory storage there), prefilled so that chunk reads copy real data. Per run:
 *   baseline   - 4 KiB writes, one at the start of every chunk, no snapshot;
 *   first      - the same writes after a take: each preserves a fresh chunk (origin read, storage write)
 *                before the 4 KiB write proceeds;
 *   re-touch   - the same writes again: every chunk is already preserved;
 *   control    - the same writes on a second device of the same size and fill that is in no snapshot,
 *                alternated with re-touch passes (re-touch, control, control, re-touch) once the snapshot's
 *                storage is flushed, so the re-touch cost is read against a no-snapshot pass of the same
 *                run and page-cache state (the first baseline runs before the take wrote 256 MiB to the
 *                storage, whose writeback would otherwise be billed to the re-touch);
 * then destroy. A fourth pass, *floor*, does the same data movement straight on the backends with no
 * engine (read the chunk from the origin backend into a new buffer, write it to a fresh storage backend
 * of the same kind, write the 4 KiB): first touch minus floor is what the engine itself adds. Writes are issued one at a time (queue depth 1) through the origin export (CheckedDevice
 * over the Tracker), as a face would. Medians over the runs; the first run also warms the JIT. Before every
 * pass the origin is flushed and, under --expose-gc (run-all.ts passes it), garbage is collected, so one
 * pass's 256 MiB of dropped buffers is not collected on the next pass's clock.
 */
import { FileBackend } from "../../src/backends/file-backend.js";
import { MemoryBackend } from "../../src/backends/memory-backend.js";
import type { BlockDevice } from "../../src/block/device.js";
import { Engine } from "../../src/engine/engine.js";
import {
  collectGarbageIfExposed,
  fixed,
  KiB,
  MiB,
  markdownTable,
  median,
  mibPerSecond,
  patternBytes,
  printSection,
  progress,
  scratchDir,
  timeMs,
} from "./bench-util.js";

const writeSizeBytes = 4 * KiB;
const copiedBytesPerPass = 256 * MiB;
const runCount = 7;
const chunkSizesBytes = [64 * KiB, 256 * KiB];
const backendKinds = ["memory", "file"] as const;
type BackendKind = (typeof backendKinds)[number];

interface CowResult {
  readonly backend: BackendKind;
  readonly chunkSizeBytes: number;
  readonly writesPerPass: number;
  readonly baselineMs: number;
  readonly firstTouchMs: number;
  readonly reTouchMs: number;
  readonly controlMs: number;
  readonly floorMs: number;
}

async function measure(backend: BackendKind, chunkSizeBytes: number): Promise<CowResult> {
  const scratch = scratchDir("cow");
  const engine = new Engine();
  try {
    const deviceSizeBytes = copiedBytesPerPass;
    const writesPerPass = deviceSizeBytes / chunkSizeBytes;
    const addDevice = async (name: string) => {
      await engine.addDevice({
        name,
        backendPath: backend === "memory" ? "memory:" : `${scratch.path}/${name}.img`,
        sizeBytes: deviceSizeBytes,
      });
      const device = engine.findExport(name)!.device;
      const fill = patternBytes(MiB, 7);
      for (let offsetBytes = 0; offsetBytes < deviceSizeBytes; offsetBytes += MiB) {
        await device.write(offsetBytes, fill);
      }
      return device;
    };
    const origin = await addDevice("disk0");
    const control = await addDevice("control0");
    const source = patternBytes(writeSizeBytes, 11);
    const pass = (device: BlockDevice) =>
      timeMs(async () => {
        for (let chunkIndex = 0; chunkIndex < writesPerPass; chunkIndex++) {
          await device.write(chunkIndex * chunkSizeBytes, source);
        }
      });
    const baselineMs: number[] = [];
    const firstTouchMs: number[] = [];
    const reTouchMs: number[] = [];
    const controlMs: number[] = [];
    const floorMs: number[] = [];
    const originBackend = engine.tracker("disk0").backend;
    for (let run = 0; run < runCount; run++) {
      // Start every run with the origin's dirty pages written back, so runs see the same page cache.
      await origin.flush();
      floorMs.push(
        await floorPass(backend, originBackend, scratch.path, chunkSizeBytes, writesPerPass, source),
      );
      await origin.flush();
      baselineMs.push(await pass(origin));
      const snapshot = await engine.createSnapshot({
        storage: backend === "memory" ? "memory:" : scratch.path,
        limitBytes: 2 * deviceSizeBytes,
        devices: ["disk0"],
        chunkSizeBytes,
      });
      await engine.takeSnapshot(snapshot.id);
      await settle(origin);
      firstTouchMs.push(await pass(origin));
      const stored = engine.snapshotInfo(snapshot.id).devices[0]?.chunksStored;
      if (stored !== writesPerPass) throw new Error(`expected ${writesPerPass} chunks stored, got ${stored}`);
      // The storage's 256 MiB written back too, then re-touch and control alternate on the same state.
      await engine.findExport(`disk0@${snapshot.id}`)!.device.flush();
      for (const device of [origin, control, control, origin]) {
        await settle(device);
        (device === origin ? reTouchMs : controlMs).push(await pass(device));
      }
      await engine.destroySnapshot(snapshot.id);
    }
    return {
      backend,
      chunkSizeBytes,
      writesPerPass,
      baselineMs: median(baselineMs),
      firstTouchMs: median(firstTouchMs),
      reTouchMs: median(reTouchMs),
      controlMs: median(controlMs),
      floorMs: median(floorMs),
    };
  } finally {
    await engine.close();
    scratch.remove();
  }
}

async function settle(origin: BlockDevice): Promise<void> {
  await origin.flush();
  collectGarbageIfExposed();
}

/** The copy-before-write data movement done directly on backends: the cost the engine cannot go below. */
async function floorPass(
  backend: BackendKind,
  originBackend: BlockDevice,
  scratchPath: string,
  chunkSizeBytes: number,
  writesPerPass: number,
  source: Uint8Array,
): Promise<number> {
  const storageSizeBytes = 4 * KiB + writesPerPass * chunkSizeBytes;
  const storage =
    backend === "memory"
      ? new MemoryBackend(storageSizeBytes)
      : FileBackend.openAnonymous(scratchPath, storageSizeBytes);
  try {
    return await timeMs(async () => {
      for (let chunkIndex = 0; chunkIndex < writesPerPass; chunkIndex++) {
        const chunk = new Uint8Array(chunkSizeBytes);
        await originBackend.read(chunkIndex * chunkSizeBytes, chunk);
        await storage.write(4 * KiB + chunkIndex * chunkSizeBytes, chunk);
        await originBackend.write(chunkIndex * chunkSizeBytes, source);
      }
    });
  } finally {
    if (storage instanceof FileBackend) await storage.close();
  }
}

function render(results: readonly CowResult[]): string {
  const rows = results.map((result) => {
    const perWriteUs = (elapsedMs: number) => (elapsedMs * 1000) / result.writesPerPass;
    const baselineUs = perWriteUs(result.baselineMs);
    const firstUs = perWriteUs(result.firstTouchMs);
    const reTouchUs = perWriteUs(result.reTouchMs);
    const controlUs = perWriteUs(result.controlMs);
    const floorUs = perWriteUs(result.floorMs);
    const copiedBytes = result.writesPerPass * result.chunkSizeBytes;
    return [
      result.backend,
      `${result.chunkSizeBytes / KiB} KiB`,
      String(result.writesPerPass),
      fixed(baselineUs, 1),
      fixed(firstUs, 1),
      `+${fixed(firstUs - baselineUs, 1)} (×${fixed(firstUs / baselineUs, 1)})`,
      fixed(floorUs, 1),
      `${firstUs >= floorUs ? "+" : ""}${fixed(firstUs - floorUs, 1)}`,
      fixed(mibPerSecond(copiedBytes, result.firstTouchMs), 0),
      fixed(mibPerSecond(copiedBytes, result.firstTouchMs - result.baselineMs), 0),
      fixed(controlUs, 1),
      fixed(reTouchUs, 1),
      `${reTouchUs >= controlUs ? "+" : ""}${fixed(((reTouchUs - controlUs) / controlUs) * 100, 1)} %`,
    ];
  });
  return [
    "### 1–2. Copy-before-write cost of 4 KiB origin writes",
    "",
    `Queue depth 1, one 4 KiB write per chunk, ${copiedBytesPerPass / MiB} MiB of chunks per pass, ` +
      `median of ${runCount} runs. *first touch*: each write preserves a fresh chunk (origin read + storage ` +
      "write) first; *re-touch*: the chunk is already preserved, against *no snapshot, same run*: a device in no snapshot, passes alternated with the re-touch ones (goal: re-touch cost ≤ 2 %). *copy MiB/s* = chunk bytes / first-touch " +
      "time; *net copy MiB/s* = chunk bytes / (first-touch − baseline time); *floor*: the same reads and " +
      "writes done directly on the backends (no engine); *engine over floor* is what the engine adds.",
    "",
    markdownTable(
      [
        "backend + storage",
        "chunk",
        "writes/pass",
        "baseline µs/write",
        "first touch µs/write",
        "overhead µs/write",
        "floor µs/write",
        "engine over floor µs",
        "copy MiB/s",
        "net copy MiB/s",
        "no snapshot, same run µs/write",
        "re-touch µs/write",
        "re-touch cost",
      ],
      rows,
    ),
  ].join("\n");
}

const results: CowResult[] = [];
for (const backend of backendKinds) {
  for (const chunkSizeBytes of chunkSizesBytes) {
    progress(`cow-cost: ${backend}, ${chunkSizeBytes / KiB} KiB chunks`);
    results.push(await measure(backend, chunkSizeBytes));
  }
}
printSection(render(results));

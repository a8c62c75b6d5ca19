/**
 * Re-touch cost (issue 16: "re-touch cost ≤ 2 % over no snapshot"), measured so that load on a shared
 * machine cannot hide or fake it: CPU time per origin write, one device, alternated many times in one run.
 *
 * One device (in RAM with RAM storage, then a file with file storage in a temp dir) is written through its origin export
 * (CheckedDevice over the Tracker, as a face writes it) with 4 KiB random writes at queue depth 16 over a
 * region whose every 64 KiB chunk was preserved by a taken snapshot. Between passes the snapshot's DiffArea
 * is detached from the tracker and attached again (hold, setDiffArea, release — what take and destroy do),
 * so *re-touch* and *no snapshot* passes run on the same device, the same page cache, the same CBT map and
 * the same offsets; the only difference is the attached area, whose chunks are all stored. Passes alternate
 * in ABBA order; the cost is the paired difference of each re-touch pass against its neighbouring
 * no-snapshot pass, in process CPU (user + system, every thread: the file system writer thread too) per
 * write and in wall time per write; the table gives the median, the quartiles and a 95 % interval of the
 * median of those paired differences.
 *
 * A second figure times the only code a re-touch adds (DiffArea.preserveForOriginWrite finding the chunk
 * stored) in a tight loop, in ns per call; and the report puts both against the whole NBD server's CPU per
 * write (`--server-us`, default 33 µs, measured by bench/nbd/cow-bench.ts).
 * Usage: node --expose-gc dist/bench/core/cow-retouch.js [--backend both|file|memory] [--pairs 24] [--writes 20000]
 *   [--server-us 33]
 */
import { parseArgs } from "node:util";
import type { BlockDevice } from "../../src/block/device.js";
import type { DiffArea } from "../../src/cow/diff-area.js";
import type { Tracker } from "../../src/cow/tracker.js";
import { Engine } from "../../src/engine/engine.js";
import {
  collectGarbageIfExposed,
  fixed,
  KiB,
  MiB,
  markdownTable,
  median,
  patternBytes,
  printSection,
  progress,
  quantile,
  scratchDir,
  seededRandom,
} from "./bench-util.js";

const { values } = parseArgs({
  options: {
    backend: { type: "string", default: "both" },
    pairs: { type: "string", default: "24" },
    writes: { type: "string", default: "20000" },
    "server-us": { type: "string", default: "33" },
  },
});
const backends = values.backend === "both" ? (["memory", "file"] as const) : [values.backend];
const pairCount = Number(values.pairs);
const writesPerPass = Number(values.writes);
const serverUsPerWrite = Number(values["server-us"]);
const writeSizeBytes = 4 * KiB;
const chunkSizeBytes = 64 * KiB;
const regionBytes = 64 * MiB;
const queueDepth = 16;

interface PassResult {
  readonly cpuUsPerWrite: number;
  readonly wallUsPerWrite: number;
}

/** Writes `offsets` at queue depth 16; CPU of the whole process and wall time, per write. */
async function pass(device: BlockDevice, offsets: Float64Array, source: Uint8Array): Promise<PassResult> {
  collectGarbageIfExposed();
  const cpuBefore = process.cpuUsage();
  const wallBefore = process.hrtime.bigint();
  let next = 0;
  const lane = async () => {
    while (next < offsets.length) {
      const offsetBytes = offsets[next++] as number;
      await device.write(offsetBytes, source);
    }
  };
  await Promise.all(Array.from({ length: queueDepth }, lane));
  const wallNs = Number(process.hrtime.bigint() - wallBefore);
  const cpu = process.cpuUsage(cpuBefore);
  return {
    cpuUsPerWrite: (cpu.user + cpu.system) / offsets.length,
    wallUsPerWrite: wallNs / 1000 / offsets.length,
  };
}

async function setArea(tracker: Tracker, area: DiffArea | null): Promise<void> {
  if (tracker.attachedDiffArea === area) return;
  await tracker.hold();
  try {
    if (area !== null) tracker.setDiffArea(null);
    tracker.setDiffArea(area);
  } finally {
    tracker.release();
  }
}

/** ns per call of the check a re-touch adds, against an empty loop of the same shape. */
function timeCheck(area: DiffArea, offsets: Float64Array): { checkNs: number; emptyNs: number } {
  const calls = 2_000_000;
  let found = 0;
  const loop = (withCheck: boolean) => {
    const startNs = process.hrtime.bigint();
    for (let i = 0; i < calls; i++) {
      const offsetBytes = offsets[i % offsets.length] as number;
      if (withCheck) {
        if (area.preserveForOriginWrite(offsetBytes, writeSizeBytes) === undefined) found++;
      } else if (offsetBytes >= 0) found++;
    }
    return Number(process.hrtime.bigint() - startNs) / calls;
  };
  const checks: number[] = [];
  const empties: number[] = [];
  for (let round = 0; round < 7; round++) {
    checks.push(loop(true));
    empties.push(loop(false));
  }
  if (found !== 2 * 7 * calls) throw new Error("a re-touch check found an unpreserved chunk");
  return { checkNs: median(checks), emptyNs: median(empties) };
}

/** The median of paired differences and a 95 % interval for it (order statistics of the binomial). */
function medianInterval(differences: readonly number[]): { low: number; high: number } {
  const sorted = [...differences].sort((a, b) => a - b);
  const n = sorted.length;
  const halfWidth = Math.ceil(0.98 * Math.sqrt(n));
  const lowRank = Math.max(0, Math.floor(n / 2) - halfWidth);
  const highRank = Math.min(n - 1, Math.ceil(n / 2) + halfWidth - 1);
  return { low: sorted[lowRank] as number, high: sorted[highRank] as number };
}

async function measure(backend: string): Promise<string> {
  const scratch = scratchDir("retouch");
  const engine = new Engine();
  try {
    await engine.addDevice({
      name: "disk0",
      backendPath: backend === "memory" ? "memory:" : `${scratch.path}/disk0.img`,
      sizeBytes: regionBytes,
    });
    const device = engine.findExport("disk0")?.device;
    if (!device) throw new Error("no origin export");
    const fill = patternBytes(MiB, 7);
    for (let offsetBytes = 0; offsetBytes < regionBytes; offsetBytes += MiB)
      await device.write(offsetBytes, fill);
    const snapshot = await engine.createSnapshot({
      storage: backend === "memory" ? "memory:" : scratch.path,
      limitBytes: 2 * regionBytes,
      devices: ["disk0"],
      chunkSizeBytes,
    });
    await engine.takeSnapshot(snapshot.id);
    const source = patternBytes(writeSizeBytes, 11);
    for (let offsetBytes = 0; offsetBytes < regionBytes; offsetBytes += chunkSizeBytes)
      await device.write(offsetBytes, source);
    const tracker = engine.tracker("disk0");
    const area = tracker.attachedDiffArea;
    if (!area || area.storedChunkCount !== regionBytes / chunkSizeBytes)
      throw new Error("every chunk of the region must be preserved first");
    await engine.findExport(`disk0@${snapshot.id}`)?.device.flush();
    await device.flush();

    const random = seededRandom(16);
    const offsets = new Float64Array(writesPerPass);
    for (let i = 0; i < writesPerPass; i++)
      offsets[i] = Math.floor(random() * (regionBytes / writeSizeBytes)) * writeSizeBytes;

    // Warm-up: both states, so the JIT has seen both before anything is counted.
    for (const attached of [area, null, area, null]) {
      await setArea(tracker, attached);
      await pass(device, offsets, source);
    }
    const cpuCost: number[] = [];
    const wallCost: number[] = [];
    const cpuAbsolute: number[] = [];
    const plainCpu: number[] = [];
    const retouchCpu: number[] = [];
    for (let pair = 0; pair < pairCount; pair++) {
      const order = pair % 2 === 0 ? [area, null] : [null, area];
      const results = new Map<DiffArea | null, PassResult>();
      for (const attached of order) {
        await setArea(tracker, attached);
        results.set(attached, await pass(device, offsets, source));
      }
      const retouch = results.get(area) as PassResult;
      const plain = results.get(null) as PassResult;
      cpuCost.push((retouch.cpuUsPerWrite / plain.cpuUsPerWrite - 1) * 100);
      wallCost.push((retouch.wallUsPerWrite / plain.wallUsPerWrite - 1) * 100);
      cpuAbsolute.push(retouch.cpuUsPerWrite - plain.cpuUsPerWrite);
      plainCpu.push(plain.cpuUsPerWrite);
      retouchCpu.push(retouch.cpuUsPerWrite);
      if (pair % 4 === 3) progress(`cow-retouch: ${pair + 1} of ${pairCount} pairs`);
    }
    // Leave the area attached so destroy finds the tracker as take left it.
    await setArea(tracker, area);
    const { checkNs, emptyNs } = timeCheck(area, offsets);
    await engine.destroySnapshot(snapshot.id);

    const spread = (values: readonly number[], digits: number, unit: string) => {
      const interval = medianInterval(values);
      return [
        `${fixed(median(values), digits)}${unit}`,
        `${fixed(quantile(values, 0.25), digits)} … ${fixed(quantile(values, 0.75), digits)}${unit}`,
        `${fixed(interval.low, digits)} … ${fixed(interval.high, digits)}${unit}`,
      ];
    };
    const addedNs = checkNs - emptyNs;
    return [
      `### Re-touch cost, in process (${backend} backend and storage)`,
      "",
      `One device, ${regionBytes / MiB} MiB region with every ${chunkSizeBytes / KiB} KiB chunk preserved; ` +
        `${writesPerPass} 4 KiB random writes at QD${queueDepth} per pass through the origin export; the ` +
        `snapshot's area detached and attached again between passes; ${pairCount} ABBA pairs. Cost = ` +
        "re-touch pass against its neighbouring no-snapshot pass. CPU = process.cpuUsage() (every thread).",
      "",
      markdownTable(
        ["measure", "median of pairs", "quartiles", "95 % interval of the median"],
        [
          ["CPU per write, cost", ...spread(cpuCost, 2, " %")],
          ["CPU per write, cost in µs", ...spread(cpuAbsolute, 3, " µs")],
          ["wall time per write, cost", ...spread(wallCost, 2, " %")],
          ["CPU per write, no snapshot", ...spread(plainCpu, 2, " µs")],
          ["CPU per write, re-touch", ...spread(retouchCpu, 2, " µs")],
        ],
      ),
      `The code a re-touch adds (preserveForOriginWrite finding its chunk stored): ${fixed(addedNs, 1)} ns ` +
        `per write (${fixed(checkNs, 1)} ns with the call, ${fixed(emptyNs, 1)} ns without). Against the NBD ` +
        `server's ${serverUsPerWrite} µs of CPU per write: ${fixed((addedNs / 1000 / serverUsPerWrite) * 100, 3)} %; ` +
        `the measured median CPU difference is ${fixed((median(cpuAbsolute) / serverUsPerWrite) * 100, 2)} % of it.`,
    ].join("\n");
  } finally {
    await engine.close();
    scratch.remove();
  }
}

const sections: string[] = [];
for (const backend of backends) {
  if (backend !== "memory" && backend !== "file") throw new Error(`unknown backend ${backend}`);
  progress(`cow-retouch: ${backend} backend`);
  sections.push(await measure(backend));
}
printSection(sections.join("\n\n"));

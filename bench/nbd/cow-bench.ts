/**
 * Copy-before-write benchmark (not a test): what a held snapshot costs the origin's writers, blocksnap
 * against QEMU's copy-before-write filter (qemu-storage-daemon: file → raw → copy-before-write with a raw
 * target file, exported over NBD), on the same page-cache-hot file, in one run. Both copy 64 KiB clusters.
 *
 * - *first touch*: fio 4 KiB randwrite at QD16 over the whole file right after the snapshot (ours: a fresh
 *   `snapshot take` in the bench server; QEMU: the filter with a fresh target), against the same writes
 *   without a snapshot (ours: origin alone; QEMU: the raw node exported without the filter). The slowdown
 *   is plain IOPS / snapshot IOPS; the issue's goal: ours ≤ 0.5 × QEMU's.
 * - *re-touch*: ours only: every chunk of a 64 MiB region preserved first (qemu-io writes the region and
 *   flushes the origin and the image, so the copies' dirty pages are written back before fio starts), then
 *   4 KiB randwrite QD16 in that region, against the same — the same qemu-io write and flush first — on a
 *   server without a snapshot (goal: ≤ 2 % cost). `--retouch-only` runs just these two, in alternating
 *   order from round to round.
 * Rounds alternate the servers; medians. qemu-storage-daemon is in Debian's qemu-system-common; without it
 * the QEMU rows are left out with the reason.
 * Usage: npm run build && node dist/bench/nbd/cow-bench.js [--size-mib 1024] [--runtime-s 4] [--rounds 3]
 *   [--retouch-only] [--page-cache large|small] (the file's page-cache shape, bench-servers.ts PageCacheShape)
 */
import * as fs from "node:fs";
import { loadavg } from "node:os";
import { join } from "node:path";
import {
  type BenchOptions,
  exec,
  execOk,
  fio,
  pageCacheShapeOf,
  pageCacheShapeReport,
  prepareFile,
  processCpuMs,
  repositoryRoot,
  type Server,
  startDaemonized,
  startOurs,
} from "./bench-servers.js";

const argv = process.argv.slice(2);
const value = (flag: string, fallback: string) => {
  const index = argv.indexOf(flag);
  return index >= 0 && argv[index + 1] !== undefined ? (argv[index + 1] as string) : fallback;
};
const options: BenchOptions = {
  sizeMib: Number(value("--size-mib", "1024")),
  runtimeSeconds: Number(value("--runtime-s", "4")),
  directory: value("--dir", "/tmp/blocksnap-nbd-bench"),
  pageCache: pageCacheShapeOf(value("--page-cache", "large")),
};
const rounds = Number(value("--rounds", "3"));
const retouchOnly = argv.includes("--retouch-only");
const retouchRegionMib = 64;
const randwrite = { rw: "randwrite", bs: "4k", iodepth: 16 } as const;
/** The chunk size of bench-server's snapshot and of QEMU's copy-before-write clusters. */
const chunkSizeBytes = 64 * 1024;

/** qemu-storage-daemon serving `file`, through a copy-before-write filter into a fresh target or plainly. */
function startQemuStorageDaemon(file: string, withFilter: boolean): Promise<Server> {
  const socket = join(options.directory, "qsd.sock");
  const pidFile = join(options.directory, "qsd.pid");
  const target = join(options.directory, "qsd-target.img");
  fs.rmSync(target, { force: true });
  if (withFilter) fs.writeFileSync(target, "");
  if (withFilter) fs.truncateSync(target, fs.statSync(file).size);
  const nodes = [
    `driver=file,filename=${file},node-name=file0`,
    "driver=raw,file=file0,node-name=origin",
    ...(withFilter
      ? [
          `driver=file,filename=${target},node-name=target-file`,
          "driver=raw,file=target-file,node-name=target",
          "driver=copy-before-write,file=origin,target=target,node-name=cbw",
        ]
      : []),
  ];
  const args = [
    ...nodes.flatMap((node) => ["--blockdev", node]),
    "--nbd-server",
    `addr.type=unix,addr.path=${socket}`,
    "--export",
    `type=nbd,id=export0,node-name=${withFilter ? "cbw" : "origin"},name=,writable=on`,
    "--pidfile",
    pidFile,
    "--daemonize",
  ];
  return startDaemonized(
    withFilter ? "QEMU copy-before-write" : "QEMU plain",
    "qemu-storage-daemon",
    args,
    socket,
    pidFile,
  );
}

/** IOPS, and the server's CPU time per write (ours only; less disturbed by other load than IOPS). */
async function measure(
  start: () => Promise<Server>,
  useOrigin: boolean,
  prepare?: (server: Server) => Promise<void>,
): Promise<{ iops: number; cpuUsPerWrite: number | null }> {
  const server = await start();
  try {
    const uri = useOrigin ? (server.originUri ?? server.uri) : server.uri;
    await prepare?.(server);
    const region = prepare === undefined ? options : { ...options, sizeMib: retouchRegionMib };
    const cpuBeforeMs = server.pid === undefined ? null : processCpuMs(server.pid);
    const { iops } = await fio(uri, randwrite, region);
    const cpuAfterMs = server.pid === undefined ? null : processCpuMs(server.pid);
    const writes = iops * options.runtimeSeconds;
    const cpuUsPerWrite =
      cpuBeforeMs === null || cpuAfterMs === null ? null : ((cpuAfterMs - cpuBeforeMs) * 1000) / writes;
    return { iops, cpuUsPerWrite };
  } finally {
    await server.stop();
  }
}

function median(values: readonly number[]): number {
  const sorted = [...values].sort((a, b) => a - b);
  return sorted[Math.floor(sorted.length / 2)] ?? Number.NaN;
}

async function main(): Promise<void> {
  const loadBefore = loadavg()
    .map((load) => load.toFixed(2))
    .join(" ");
  const file = await prepareFile(options);
  const cacheShape = pageCacheShapeReport(file, options);
  const haveQemu = (await exec("qemu-storage-daemon", ["--version"])).code === 0;
  // Writes the region through the origin (on a snapshot server: preserving every chunk of it), then
  // flushes the origin and, with a snapshot, the image (its storage), so that both sides start from the
  // same written-back page cache.
  const writeRegion = async (server: Server) => {
    const origin = server.originUri ?? server.uri;
    await execOk("qemu-io", ["-f", "raw", origin, "-c", `write -P 7 0 ${retouchRegionMib}M`, "-c", "flush"]);
    if (server.uri !== origin) await execOk("qemu-io", ["-f", "raw", server.uri, "-c", "flush"]);
  };
  const samples = new Map<string, number[]>();
  const cpuSamples = new Map<string, number[]>();
  const add = (name: string, result: { iops: number; cpuUsPerWrite: number | null }) => {
    samples.set(name, [...(samples.get(name) ?? []), result.iops]);
    const cpu = result.cpuUsPerWrite;
    if (cpu !== null) cpuSamples.set(name, [...(cpuSamples.get(name) ?? []), cpu]);
    console.error(
      `${name}: ${(result.iops / 1000).toFixed(1)}k IOPS${cpu === null ? "" : `, server CPU ${cpu.toFixed(1)} µs/write`}`,
    );
  };
  const retouchPair = [
    async () =>
      add(
        "ours plain 64 MiB",
        await measure(() => startOurs(file, options.directory, false), true, writeRegion),
      ),
    async () =>
      add("ours re-touch", await measure(() => startOurs(file, options.directory, true), true, writeRegion)),
  ];
  for (let round = 0; round < rounds; round++) {
    for (const run of round % 2 === 0 ? retouchPair : [...retouchPair].reverse()) await run();
    if (retouchOnly) continue;
    add("ours plain", await measure(() => startOurs(file, options.directory, false), true));
    add("ours first touch", await measure(() => startOurs(file, options.directory, true), true));
    if (haveQemu) {
      add("QEMU plain", await measure(() => startQemuStorageDaemon(file, false), false));
      add("QEMU first touch", await measure(() => startQemuStorageDaemon(file, true), false));
    }
  }
  const m = (name: string) => median(samples.get(name) ?? []);
  const ourSlowdown = m("ours plain") / m("ours first touch");
  const qemuSlowdown = m("QEMU plain") / m("QEMU first touch");
  const retouchCost = m("ours plain 64 MiB") / m("ours re-touch") - 1;
  const row = (name: string, plain: number, cow: number) =>
    `| ${name} | ${(plain / 1000).toFixed(1)}k | ${(cow / 1000).toFixed(1)}k | ${(plain / cow).toFixed(2)}× |`;
  const firstTouchTable = [
    "| server | IOPS without snapshot | IOPS first touch | slowdown |",
    "|---|---|---|---|",
    row("blocksnap", m("ours plain"), m("ours first touch")),
    haveQemu
      ? row("QEMU copy-before-write filter", m("QEMU plain"), m("QEMU first touch"))
      : "| QEMU | qemu-storage-daemon not installed (Debian: qemu-system-common) | | |",
    "",
    haveQemu
      ? `Our slowdown / QEMU's: ${(ourSlowdown / qemuSlowdown).toFixed(2)}× (goal ≤ 0.5×).`
      : "Our slowdown / QEMU's: not measured.",
    "",
  ];
  const cpuOf = (name: string) => median(cpuSamples.get(name) ?? []);
  // Server CPU per first touch, paired by round: the first-touch run's CPU above the same round's plain
  // CPU per write, over the chunks its writes touched first. fio's random map writes every 4 KiB block of
  // the file once before any twice, so n writes touch a chunk of b blocks with probability 1 - (1 - n/N)^b.
  const blockCount = (options.sizeMib * 1024 * 1024) / 4096;
  const blocksPerChunk = chunkSizeBytes / 4096;
  const extraCpuPerFirstTouch = (cpuSamples.get("ours first touch") ?? []).flatMap((cpuFirst, round) => {
    const cpuPlain = cpuSamples.get("ours plain")?.[round];
    const iops = samples.get("ours first touch")?.[round];
    if (cpuPlain === undefined || iops === undefined) return [];
    const writes = Math.min(iops * options.runtimeSeconds, blockCount);
    const firstTouches = (blockCount / blocksPerChunk) * (1 - (1 - writes / blockCount) ** blocksPerChunk);
    return [((cpuFirst - cpuPlain) * writes) / firstTouches];
  });
  const retouchCpuCost = cpuOf("ours re-touch") / cpuOf("ours plain 64 MiB") - 1;
  const everyRun = [...samples].map(
    ([name, values]) => `${name}: ${values.map((iops) => `${(iops / 1000).toFixed(1)}k`).join(", ")}`,
  );
  const markdown = [
    "## Copy-before-write: blocksnap vs QEMU's copy-before-write filter (`node dist/bench/nbd/cow-bench.js`)",
    "",
    `fio --ioengine=nbd 4 KiB randwrite QD16, ${options.runtimeSeconds} s per run, ${options.sizeMib} MiB page-cache-hot file, 64 KiB chunks/clusters; medians of ${rounds} alternating rounds; load average before: ${loadBefore}. Page cache: ${cacheShape}.`,
    "",
    ...(retouchOnly ? [] : firstTouchTable),
    `Re-touch (every chunk of a ${retouchRegionMib} MiB region already preserved): ${(m("ours re-touch") / 1000).toFixed(1)}k IOPS against ${(m("ours plain 64 MiB") / 1000).toFixed(1)}k without a snapshot: cost ${(100 * retouchCost).toFixed(1)} % (goal ≤ 2 %).`,
    "",
    ...(retouchOnly
      ? []
      : [
          `Server CPU per first touch above a plain write (paired by round; fio's random map gives the chunks touched): ${extraCpuPerFirstTouch.map((us) => `${us.toFixed(1)} µs`).join(", ")} (median ${median(extraCpuPerFirstTouch).toFixed(1)} µs); server CPU per write without a snapshot ${cpuOf("ours plain").toFixed(1)} µs, with a fresh snapshot ${cpuOf("ours first touch").toFixed(1)} µs.`,
          "",
        ]),
    `Server CPU time per write (user + system, every thread; less disturbed by other load than IOPS): re-touch ${cpuOf("ours re-touch").toFixed(1)} µs, without a snapshot ${cpuOf("ours plain 64 MiB").toFixed(1)} µs: cost ${(100 * retouchCpuCost).toFixed(1)} %.`,
    "",
    `Every run (IOPS): ${everyRun.join("; ")}.`,
    "",
  ].join("\n");
  console.log(markdown);
  const resultsDirectory = join(repositoryRoot(), "bench", "results");
  fs.mkdirSync(resultsDirectory, { recursive: true });
  fs.writeFileSync(join(resultsDirectory, "cow.md"), markdown);
}

await main();

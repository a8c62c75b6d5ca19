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
 * - *the C reference*: the same first-touch runs on nbdkit's file plugin, plainly and under a copy-before-write
 *   filter in C (bench/nbd/c-cbw-filter.c: the same algorithm as ours, nbdkit's threads doing the copies):
 *   what a C server reaches on this machine.
 * Rounds alternate the servers; medians. Every server's CPU time per first touch above a plain write is
 * reported too. qemu-storage-daemon is in Debian's qemu-system-common, the C filter needs gcc and
 * nbdkit-plugin-dev; without them those rows are left out with the reason.
 * Usage: npm run build && node dist/bench/nbd/cow-bench.js [--size-mib 1024] [--runtime-s 4] [--rounds 3]
 *   [--retouch-only | --first-touch-only] [--page-cache large|small] (the file's page-cache shape,
 *   bench-servers.ts PageCacheShape)
 *
 * Memory: a first touch writes a new page-cache page for every 4 KiB it copies, and what a new page costs
 * depends on where it comes from. In a VM with free page reporting (this one: virtio_balloon,
 * /sys/module/page_reporting) memory that stays free for about two seconds goes back to the host, and the
 * first write to such a page faults in the hypervisor (1.6–2.7 µs per 4 KiB page here, 25–45 µs per 64 KiB
 * chunk; a page freed moments ago costs next to nothing). A copy target left from an earlier run and
 * removed right before the next one would hand that run cheap pages. So every target is removed as soon
 * as its server stops, and every run starts from the same memory: with `--memory fresh` (the default) a
 * helper process touches and frees `freshMemoryMib` right before it, so the copies get just-freed pages
 * (a machine without reporting); with `--memory reported` the run waits `reportWaitMs` first, so whatever
 * was freed has gone back to the host (the VM's worst case).
 */
import * as fs from "node:fs";
import { loadavg } from "node:os";
import { join } from "node:path";
import { median } from "../core/bench-util.js";
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
  startNbdkit,
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
const firstTouchOnly = argv.includes("--first-touch-only");
const memoryMode = value("--memory", "fresh");
if (memoryMode !== "fresh" && memoryMode !== "reported") {
  console.error(`cow-bench: --memory must be fresh or reported, not ${JSON.stringify(memoryMode)}`);
  process.exit(2);
}
const retouchRegionMib = 64;
const randwrite = { rw: "randwrite", bs: "4k", iodepth: 16 } as const;
/** The chunk size of bench-server's snapshot and of QEMU's copy-before-write clusters. */
const chunkSizeBytes = 64 * 1024;
/** Memory touched and freed before every run (see Memory above): the copies of the whole file and more. */
const freshMemoryMib = options.sizeMib + 512;

/** Longer than the kernel's page-reporting delay (2 s) and one reporting pass. */
const reportWaitMs = 4000;

/** Puts free memory in the state `--memory` asks for (see Memory above). */
async function settleMemory(): Promise<void> {
  if (memoryMode === "reported") {
    await new Promise((resolve) => setTimeout(resolve, reportWaitMs));
    return;
  }
  await execOk(process.execPath, ["-e", `Buffer.alloc(${freshMemoryMib} * 1024 * 1024, 1)`]);
}

/** The server, whose stop also removes the copy target it wrote (its pages freed, not written back). */
function removingTarget(server: Server, target: string): Server {
  return {
    ...server,
    stop: async () => {
      await server.stop();
      fs.rmSync(target, { force: true });
    },
  };
}

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
  const started = startDaemonized(
    withFilter ? "QEMU copy-before-write" : "QEMU plain",
    "qemu-storage-daemon",
    args,
    socket,
    pidFile,
  );
  return started.then((server) => removingTarget(server, target));
}

/** nbdkit's file plugin under the C copy-before-write filter, with a fresh target. */
function startCFilter(file: string, filterPath: string): Promise<Server> {
  const socket = join(options.directory, "c-cbw.sock");
  const pidFile = join(options.directory, "c-cbw.pid");
  const target = join(options.directory, "c-cbw-target.img");
  fs.rmSync(target, { force: true });
  const args = ["-U", socket, "-P", pidFile, `--filter=${filterPath}`, "file", file, `target=${target}`];
  const started = startDaemonized("C copy-before-write filter", "nbdkit", args, socket, pidFile);
  return started.then((server) => removingTarget(server, target));
}

/** Builds the C filter (bench/nbd/build-c-cbw-filter.sh); its path, or why there is none. */
async function buildCFilter(): Promise<{ path: string } | { reason: string }> {
  const script = join(repositoryRoot(), "bench", "nbd", "build-c-cbw-filter.sh");
  const built = await exec("sh", [script]);
  if (built.code !== 0) {
    return { reason: `the C filter did not build (needs gcc and nbdkit-plugin-dev): ${built.stderr.trim()}` };
  }
  return { path: built.stdout.trim() };
}

/** IOPS, and the server's CPU time per write (less disturbed by other load than IOPS). */
async function measure(
  start: () => Promise<Server>,
  useOrigin: boolean,
  prepare?: (server: Server) => Promise<void>,
): Promise<{ iops: number; cpuUsPerWrite: number | null }> {
  await settleMemory();
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

async function main(): Promise<void> {
  const loadBefore = loadavg()
    .map((load) => load.toFixed(2))
    .join(" ");
  const file = await prepareFile(options);
  const cacheShape = pageCacheShapeReport(file, options);
  const haveQemu = (await exec("qemu-storage-daemon", ["--version"])).code === 0;
  const cFilter = retouchOnly ? { reason: "not run" } : await buildCFilter();
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
    if (!firstTouchOnly) {
      for (const run of round % 2 === 0 ? retouchPair : [...retouchPair].reverse()) await run();
    }
    if (retouchOnly) continue;
    add("ours plain", await measure(() => startOurs(file, options.directory, false), true));
    add("ours first touch", await measure(() => startOurs(file, options.directory, true), true));
    if (haveQemu) {
      add("QEMU plain", await measure(() => startQemuStorageDaemon(file, false), false));
      add("QEMU first touch", await measure(() => startQemuStorageDaemon(file, true), false));
    }
    if ("path" in cFilter) {
      const filterPath = cFilter.path;
      add("C plain", await measure(() => startNbdkit(file, options.directory), false));
      add("C first touch", await measure(() => startCFilter(file, filterPath), false));
    }
  }
  const m = (name: string) => median(samples.get(name) ?? []);
  const ourSlowdown = m("ours plain") / m("ours first touch");
  const qemuSlowdown = m("QEMU plain") / m("QEMU first touch");
  const cSlowdown = m("C plain") / m("C first touch");
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
    "path" in cFilter
      ? row("C filter on nbdkit (bench/nbd/c-cbw-filter.c)", m("C plain"), m("C first touch"))
      : `| C filter on nbdkit | ${cFilter.reason} | | |`,
    "",
    haveQemu
      ? `Our slowdown / QEMU's: ${(ourSlowdown / qemuSlowdown).toFixed(2)}× (goal ≤ 0.5×).`
      : "Our slowdown / QEMU's: not measured.",
    "path" in cFilter
      ? `Our slowdown / the C filter's: ${(ourSlowdown / cSlowdown).toFixed(2)}×; our first-touch IOPS / the C filter's: ${(m("ours first touch") / m("C first touch")).toFixed(2)}×.`
      : "Our slowdown / the C filter's: not measured.",
    "",
  ];
  const cpuOf = (name: string) => median(cpuSamples.get(name) ?? []);
  // Server CPU per first touch, paired by round: the first-touch run's CPU above the same round's plain
  // CPU per write, over the chunks its writes touched first. fio's random map writes every 4 KiB block of
  // the file once before any twice, so n writes touch a chunk of b blocks with probability 1 - (1 - n/N)^b.
  const blockCount = (options.sizeMib * 1024 * 1024) / 4096;
  const blocksPerChunk = chunkSizeBytes / 4096;
  const extraCpuPerFirstTouch = (server: string) =>
    (cpuSamples.get(`${server} first touch`) ?? []).flatMap((cpuFirst, round) => {
      const cpuPlain = cpuSamples.get(`${server} plain`)?.[round];
      const iops = samples.get(`${server} first touch`)?.[round];
      if (cpuPlain === undefined || iops === undefined) return [];
      const writes = Math.min(iops * options.runtimeSeconds, blockCount);
      const firstTouches = (blockCount / blocksPerChunk) * (1 - (1 - writes / blockCount) ** blocksPerChunk);
      return [((cpuFirst - cpuPlain) * writes) / firstTouches];
    });
  const cpuRow = (server: string, label: string) => {
    const extra = extraCpuPerFirstTouch(server);
    return extra.length === 0
      ? []
      : [
          `| ${label} | ${cpuOf(`${server} plain`).toFixed(1)} µs | ${cpuOf(`${server} first touch`).toFixed(1)} µs | ${median(extra).toFixed(1)} µs (${extra.map((us) => us.toFixed(1)).join(", ")}) |`,
        ];
  };
  const retouchCpuCost = cpuOf("ours re-touch") / cpuOf("ours plain 64 MiB") - 1;
  const everyRun = [...samples].map(
    ([name, values]) => `${name}: ${values.map((iops) => `${(iops / 1000).toFixed(1)}k`).join(", ")}`,
  );
  const retouchLines = [
    `Re-touch (every chunk of a ${retouchRegionMib} MiB region already preserved): ${(m("ours re-touch") / 1000).toFixed(1)}k IOPS against ${(m("ours plain 64 MiB") / 1000).toFixed(1)}k without a snapshot: cost ${(100 * retouchCost).toFixed(1)} % (goal ≤ 2 %).`,
    "",
  ];
  const retouchCpuLines = [
    `Server CPU time per write (user + system, every thread; less disturbed by other load than IOPS): re-touch ${cpuOf("ours re-touch").toFixed(1)} µs, without a snapshot ${cpuOf("ours plain 64 MiB").toFixed(1)} µs: cost ${(100 * retouchCpuCost).toFixed(1)} %.`,
    "",
  ];
  const markdown = [
    "## Copy-before-write: blocksnap vs QEMU's copy-before-write filter (`node dist/bench/nbd/cow-bench.js`)",
    "",
    `fio --ioengine=nbd 4 KiB randwrite QD16, ${options.runtimeSeconds} s per run, ${options.sizeMib} MiB page-cache-hot file, 64 KiB chunks/clusters; medians of ${rounds} alternating rounds; load average before: ${loadBefore}. Page cache: ${cacheShape}. Free memory before each run: ${memoryMode === "fresh" ? `just freed (${freshMemoryMib} MiB touched and freed by a helper)` : `returned to the host (${reportWaitMs / 1000} s idle; free page reporting)`}.`,
    "",
    ...(retouchOnly ? [] : firstTouchTable),
    ...(firstTouchOnly ? [] : retouchLines),
    ...(retouchOnly
      ? []
      : [
          "Server CPU (user + system, every thread of its process) per write, and per first touch above a plain write (paired by round; fio's random map gives the chunks touched):",
          "",
          "| server | per write, plain | per write, first touch run | per first touch above plain (median; by round) |",
          "|---|---|---|---|",
          ...cpuRow("ours", "blocksnap"),
          ...cpuRow("QEMU", "QEMU copy-before-write filter"),
          ...cpuRow("C", "C filter on nbdkit"),
          "",
        ]),
    ...(firstTouchOnly ? [] : retouchCpuLines),
    `Every run (IOPS): ${everyRun.join("; ")}.`,
    "",
  ].join("\n");
  console.log(markdown);
  const resultsDirectory = join(repositoryRoot(), "bench", "results");
  fs.mkdirSync(resultsDirectory, { recursive: true });
  fs.writeFileSync(join(resultsDirectory, "cow.md"), markdown);
}

await main();

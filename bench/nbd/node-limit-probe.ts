/**
 * What bounds an NBD server in Node on this machine (not a test; bench code only). Races, in one run, on
 * the same page-cache-hot file over Unix sockets:
 * - `nbdkit file` (C, blocking threads: the physical bound on these cores),
 * - blocksnap's full stack (bench-server.ts: Engine → Tracker with CBT → CheckedDevice → NbdServer, the
 *   origin export, so that it serves the same plain file as the others),
 * - bare-nbd-server.ts, a minimal Node NBD server, in six shapes: one event loop, N worker threads that
 *   all listen on the same descriptor, or N workers fed accepted descriptors by the main thread; each with
 *   fs.read / fs.write (libuv pool) or with fs.readSync / fs.writeSync on the loop; plus one loop that
 *   receives WRITE payloads in place (`onread`).
 * Rows: nbdcopy of the whole file to null: with 4 connections (multi-conn) and with 1, fio --ioengine=nbd 4 KiB
 * randread at QD1 and QD32, 4 KiB randwrite at QD32, 256 KiB sequential write at QD16. Each round runs every row on every server,
 * the servers' order rotating from round to round; the table gives each server's median and, because the
 * two cores are shared with other work, the median of the ratios taken within each round. Run it under
 * `nice -n -10` (never real-time priority: it livelocks this machine).
 *
 * Usage: npm run build && nice -n -10 node dist/bench/nbd/node-limit-probe.js
 *          [--size-mib 1024] [--runtime-s 3] [--rounds 5] [--workers 2] [--dir /tmp/blocksnap-node-limit]
 *          [--page-cache large|small] (the file's page-cache shape, bench-servers.ts PageCacheShape)
 * Writes the Markdown table to bench/results/node-limit.md.
 */
import { spawn } from "node:child_process";
import * as fs from "node:fs";
import { availableParallelism, cpus, loadavg } from "node:os";
import { join } from "node:path";
import { median } from "../core/bench-util.js";
import {
  type BenchOptions,
  exec,
  execOk,
  type FioJob,
  fio,
  here,
  pageCacheReport,
  pageCacheShapeOf,
  pageCacheShapeReport,
  prepareFile,
  repositoryRoot,
  type Server,
  startNbdkit,
  startOurs,
} from "./bench-servers.js";

interface Options extends BenchOptions {
  readonly rounds: number;
  readonly workers: number;
  readonly copiesPerRound: number;
}

function parseOptions(argv: readonly string[]): Options {
  const value = (flag: string, fallback: string) => {
    const index = argv.indexOf(flag);
    return index >= 0 && argv[index + 1] !== undefined ? argv[index + 1]! : fallback;
  };
  return {
    sizeMib: Number(value("--size-mib", "1024")),
    runtimeSeconds: Number(value("--runtime-s", "3")),
    directory: value("--dir", "/tmp/blocksnap-node-limit"),
    rounds: Number(value("--rounds", "5")),
    workers: Number(value("--workers", "2")),
    copiesPerRound: Number(value("--copies", "3")),
    pageCache: pageCacheShapeOf(value("--page-cache", "large")),
  };
}

async function startBare(
  name: string,
  file: string,
  directory: string,
  socketName: string,
  flags: readonly string[],
): Promise<Server> {
  const socket = join(directory, socketName);
  const child = spawn(process.execPath, [join(here, "bare-nbd-server.js"), file, socket, ...flags], {
    stdio: ["ignore", "pipe", "inherit"],
  });
  await new Promise<void>((resolve, reject) => {
    let output = "";
    child.stdout?.on("data", (chunk: Buffer) => {
      output += chunk.toString("utf8");
      if (/^ready$/m.test(output)) resolve();
    });
    child.once("exit", (code) => reject(new Error(`${name} exited with ${code}`)));
  });
  return {
    name,
    uri: `nbd+unix:///?socket=${socket}`,
    stop: async () => {
      if (child.exitCode !== null) return;
      child.kill("SIGTERM");
      await new Promise((resolve) => child.once("exit", resolve));
    },
  };
}

interface Row {
  readonly test: string;
  readonly unit: "MiB/s" | "IOPS";
  readonly run: (uri: string) => Promise<number>;
}

function format(value: number, unit: string): string {
  if (unit === "IOPS") return `${(value / 1000).toFixed(1)}k`;
  return value.toFixed(0);
}

const NBDKIT = "nbdkit file";
const OURS = "blocksnap full stack";
const LOOP = "bare, 1 loop, fs.read";

async function main(): Promise<void> {
  const options = parseOptions(process.argv.slice(2));
  const file = await prepareFile(options);
  const cacheBefore = await pageCacheReport(file);
  const cacheShape = pageCacheShapeReport(file, options);
  const loadBefore = loadavg();
  const workersName = `bare, ${options.workers} workers, fs.read`;
  const workersSyncName = `bare, ${options.workers} workers, readSync`;
  const loopSyncName = "bare, 1 loop, readSync";
  const inPlaceName = "bare, 1 loop, fs.read, payload received in place";
  const dispatchName = `bare, ${options.workers} workers fed by main, fs.read`;
  const dispatchSyncName = `bare, ${options.workers} workers fed by main, readSync`;
  const nbdcopyOnce = async (uri: string, connections = 4) => {
    const start = process.hrtime.bigint();
    await execOk("nbdcopy", [`--connections=${connections}`, uri, "null:"]);
    return options.sizeMib / (Number(process.hrtime.bigint() - start) / 1e9);
  };
  const nbdcopyRow = (connections: number): Row => ({
    test: `nbdcopy ${options.sizeMib} MiB to null:, ${connections} connection${connections === 1 ? "" : "s"}`,
    unit: "MiB/s",
    run: async (uri) => {
      const samples: number[] = [];
      for (let copy = 0; copy < options.copiesPerRound; copy += 1)
        samples.push(await nbdcopyOnce(uri, connections));
      return median(samples);
    },
  });
  const fioRow = (test: string, job: FioJob, unit: "MiB/s" | "IOPS"): Row => ({
    test,
    unit,
    run: async (uri) => {
      const result = await fio(uri, job, options);
      return unit === "IOPS" ? result.iops : result.mibPerSecond;
    },
  });
  const rows: Row[] = [
    nbdcopyRow(4),
    nbdcopyRow(1),
    fioRow("fio randread 4 KiB QD1", { rw: "randread", bs: "4k", iodepth: 1 }, "IOPS"),
    fioRow("fio randread 4 KiB QD32", { rw: "randread", bs: "4k", iodepth: 32 }, "IOPS"),
    fioRow("fio randwrite 4 KiB QD32", { rw: "randwrite", bs: "4k", iodepth: 32 }, "IOPS"),
    fioRow("fio write 256 KiB QD16", { rw: "write", bs: "256k", iodepth: 16 }, "MiB/s"),
  ];
  const servers: Server[] = [];
  // samples[row][server] = one value per round.
  const samples = rows.map(() => new Map<string, number[]>());
  const loads: string[] = [];
  try {
    servers.push(await startNbdkit(file, options.directory));
    servers.push({ ...(await startOurs(file, options.directory, false)), name: OURS });
    servers.push(await startBare(LOOP, file, options.directory, "bare-loop.sock", ["--shape", "loop"]));
    servers.push(
      await startBare(loopSyncName, file, options.directory, "bare-loop-sync.sock", [
        "--shape",
        "loop",
        "--sync",
      ]),
    );
    servers.push(
      await startBare(inPlaceName, file, options.directory, "bare-loop-in-place.sock", [
        "--shape",
        "loop",
        "--in-place",
      ]),
    );
    const workerFlags = ["--shape", "workers", "--workers", String(options.workers)];
    servers.push(await startBare(workersName, file, options.directory, "bare-workers.sock", workerFlags));
    servers.push(
      await startBare(workersSyncName, file, options.directory, "bare-workers-sync.sock", [
        ...workerFlags,
        "--sync",
      ]),
    );
    const dispatchFlags = ["--shape", "dispatch", "--workers", String(options.workers)];
    servers.push(await startBare(dispatchName, file, options.directory, "bare-dispatch.sock", dispatchFlags));
    servers.push(
      await startBare(dispatchSyncName, file, options.directory, "bare-dispatch-sync.sock", [
        ...dispatchFlags,
        "--sync",
      ]),
    );
    // Warm-up: one untimed copy per server (connections, page cache, JIT).
    for (const server of servers) await nbdcopyOnce(server.uri);
    for (let round = 0; round < options.rounds; round += 1) {
      loads.push(loadavg()[0]!.toFixed(1));
      const order = servers.map((_, index) => servers[(index + round) % servers.length]!);
      for (const [rowIndex, row] of rows.entries()) {
        for (const server of order) {
          const value = await row.run(server.uri);
          const list = samples[rowIndex]!.get(server.name) ?? [];
          list.push(value);
          samples[rowIndex]!.set(server.name, list);
          console.error(
            `round ${round + 1} ${row.test}: ${server.name} ${format(value, row.unit)} ${row.unit}`,
          );
        }
      }
    }
    loads.push(loadavg()[0]!.toFixed(1));
  } finally {
    for (const server of servers) await server.stop();
  }
  const names = servers.map((server) => server.name);
  // The best of several servers in one round (the bound is whichever shape does best on that row).
  const best = (rowIndex: number, group: readonly string[]) => {
    const lists = group.map((name) => samples[rowIndex]!.get(name) ?? []);
    return lists[0]!.map((_, round) => Math.max(...lists.map((list) => list[round]!)));
  };
  // The median over rounds of a ratio taken within each round, with its range.
  const ratio = (rowIndex: number, numerator: readonly string[], denominator: readonly string[]) => {
    const bottom = best(rowIndex, denominator);
    const ratios = best(rowIndex, numerator).map((value, round) => value / bottom[round]!);
    if (ratios.length === 0) return "–";
    return `${median(ratios).toFixed(2)}× (${Math.min(...ratios).toFixed(2)}–${Math.max(...ratios).toFixed(2)})`;
  };
  const loops = [LOOP, loopSyncName, inPlaceName];
  const workers = [workersName, workersSyncName, dispatchName, dispatchSyncName];
  const header = [
    "test",
    ...names,
    "best 1 loop / nbdkit",
    "blocksnap / best 1 loop",
    "blocksnap / nbdkit",
    "best workers / best 1 loop",
    "best workers / nbdkit",
  ];
  const tableRows = rows.map((row, rowIndex) => [
    `${row.test} (${row.unit})`,
    ...names.map((name) => format(median(samples[rowIndex]!.get(name) ?? []), row.unit)),
    ratio(rowIndex, loops, [NBDKIT]),
    ratio(rowIndex, [OURS], loops),
    ratio(rowIndex, [OURS], [NBDKIT]),
    ratio(rowIndex, workers, loops),
    ratio(rowIndex, workers, [NBDKIT]),
  ]);
  const table = [header, header.map(() => "---"), ...tableRows].map((cells) => `| ${cells.join(" | ")} |`);
  const versions = await Promise.all([
    exec("nbdkit", ["--version"]).then((result) => result.stdout.trim()),
    exec("nbdcopy", ["--version"]).then((result) => result.stdout.split("\n")[0]?.trim() ?? ""),
    exec("fio", ["--version"]).then((result) => result.stdout.trim()),
  ]);
  const markdown = [
    "# Node's bound: bare NBD servers in Node vs nbdkit",
    "",
    `Machine: ${availableParallelism()} × ${cpus()[0]?.model ?? "cpu"}; Node ${process.version}; ${versions.join("; ")}.`,
    `File: ${options.sizeMib} MiB, page cache before: ${cacheBefore}, after: ${await pageCacheReport(file)}; ${cacheShape}.`,
    `${options.rounds} rounds, servers' order rotating; fio runs of ${options.runtimeSeconds} s (one connection),` +
      ` nbdcopy: median of ${options.copiesPerRound} copies per round. Load average (1 min) at each round's` +
      ` start and at the end: ${loads.join(", ")} (before the warm-up: ${loadBefore[0]!.toFixed(1)}).`,
    "Values: each server's median over the rounds. Ratios: median of the ratios within each round (range).",
    "",
    ...table,
    "",
  ].join("\n");
  console.log(markdown);
  const resultsDirectory = join(repositoryRoot(), "bench", "results");
  fs.mkdirSync(resultsDirectory, { recursive: true });
  fs.writeFileSync(join(resultsDirectory, "node-limit.md"), markdown);
  console.error(`written to ${join(resultsDirectory, "node-limit.md")}`);
}

await main();

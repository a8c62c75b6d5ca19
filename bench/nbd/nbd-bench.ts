/**
 * NBD benchmark (not a test): races blocksnap's NbdServer (FileBackend export, own process) against
 * `nbdkit file` and `qemu-nbd -f raw -t -e 0` on the same page-cache-hot file, in one run, with the same
 * clients: `nbdcopy URI null:` (sequential read of everything; 4 connections and 1), fio --ioengine=nbd 4 KiB randread at QD32
 * and QD1, 4 KiB randwrite at QD32 and 256 KiB sequential write at QD16. The machine has 2 cores shared by
 * server and client, so run-to-run noise is about ±30% (docs/design/nbd-notes.md). Tests run in test-major order (all
 * servers for one test, then the next test) so that drift hits every server alike. Prints a table with
 * ratios and writes it as Markdown to bench/results/nbd.md.
 *
 * Usage: npm run build && node dist/bench/nbd/nbd-bench.js [--size-mib 1024] [--runtime-s 4] [--dir /tmp/x]
 *   [--page-cache large|small] (the file's page-cache shape, bench-servers.ts PageCacheShape) [--only SUBSTRING] (only the rows whose name contains it, e.g. "256 KiB")
 */
import * as fs from "node:fs";
import { availableParallelism, cpus, totalmem } from "node:os";
import { join } from "node:path";
import {
  type BenchOptions,
  exec,
  execOk,
  type FioJob,
  fio,
  pageCacheReport,
  pageCacheShapeOf,
  pageCacheShapeReport,
  prepareFile,
  repositoryRoot,
  type Server,
  startNbdkit,
  startOurs,
  startQemuNbd,
} from "./bench-servers.js";

interface Options extends BenchOptions {
  readonly only: string;
}

interface Measurement {
  readonly test: string;
  readonly unit: string;
  readonly values: Map<string, number>;
}

function parseOptions(argv: readonly string[]): Options {
  const value = (flag: string, fallback: string) => {
    const index = argv.indexOf(flag);
    return index >= 0 && argv[index + 1] !== undefined ? argv[index + 1]! : fallback;
  };
  return {
    sizeMib: Number(value("--size-mib", "1024")),
    runtimeSeconds: Number(value("--runtime-s", "4")),
    directory: value("--dir", "/tmp/blocksnap-nbd-bench"),
    only: value("--only", ""),
    pageCache: pageCacheShapeOf(value("--page-cache", "large")),
  };
}

/** Seconds for one `nbdcopy [FLAGS] URI null:`. */
async function nbdcopyOnce(uri: string, flags: readonly string[] = []): Promise<number> {
  const start = process.hrtime.bigint();
  await execOk("nbdcopy", [...flags, uri, "null:"]);
  return Number(process.hrtime.bigint() - start) / 1e9;
}

/**
 * nbdcopy is short (about half a second), so drift between servers matters more than within one: every
 * server gets an untimed warm-up copy, then `rounds` timed copies alternate between the servers, and each
 * server's median counts.
 */
async function nbdcopyInterleaved(
  uris: ReadonlyMap<string, string>,
  rounds: number,
  copy: (uri: string) => Promise<number>,
): Promise<Map<string, number>> {
  for (const uri of uris.values()) await copy(uri);
  const samples = new Map<string, number[]>([...uris.keys()].map((name) => [name, []]));
  for (let round = 0; round < rounds; round += 1) {
    for (const [name, uri] of uris) samples.get(name)!.push(await copy(uri));
  }
  return new Map(
    [...samples].map(([name, values]) => [
      name,
      values.sort((x, y) => x - y)[Math.floor(values.length / 2)]!,
    ]),
  );
}

function format(value: number, unit: string): string {
  if (unit === "s") return value.toFixed(2);
  if (unit === "IOPS") return `${(value / 1000).toFixed(1)}k`;
  return value.toFixed(0);
}

function table(measurements: readonly Measurement[], servers: readonly string[]): string {
  const header = ["test", ...servers, "vs nbdkit", "vs qemu-nbd"];
  const rows = measurements.map((measurement) => {
    const ours = measurement.values.get("blocksnap") ?? Number.NaN;
    // A ratio above 1 means blocksnap is better: for seconds, lower is better.
    const ratio = (peer: string) => {
      const theirs = measurement.values.get(peer) ?? Number.NaN;
      const value = measurement.unit === "s" ? theirs / ours : ours / theirs;
      return `${value.toFixed(2)}×`;
    };
    return [
      `${measurement.test} (${measurement.unit})`,
      ...servers.map((server) => format(measurement.values.get(server) ?? Number.NaN, measurement.unit)),
      ratio("nbdkit file"),
      ratio("qemu-nbd"),
    ];
  });
  const lines = [header, header.map(() => "---"), ...rows].map((row) => `| ${row.join(" | ")} |`);
  return lines.join("\n");
}

type Target = "origin" | "image" | "origin with snapshot held";

interface BenchTest {
  readonly test: string;
  readonly unit: string;
  /** Which blocksnap export the row measures; peers always serve the plain file. */
  readonly target: Target;
  readonly run: (uri: string) => Promise<number>;
}

async function main(): Promise<void> {
  const options = parseOptions(process.argv.slice(2));
  const file = await prepareFile(options);
  const cacheBefore = await pageCacheReport(file);
  const cacheShape = pageCacheShapeReport(file, options);
  const measurements: Measurement[] = [];
  const fioTest = (test: string, job: FioJob, unit: string, target: Target): BenchTest => ({
    test,
    unit,
    target,
    run: async (uri: string) => {
      const result = await fio(uri, job, options);
      return unit === "IOPS" ? result.iops : result.mibPerSecond;
    },
  });
  const allTests: BenchTest[] = [
    {
      test: `nbdcopy ${options.sizeMib} MiB to null:`,
      unit: "s",
      target: "image",
      run: (uri) => nbdcopyOnce(uri),
    },
    {
      test: `nbdcopy ${options.sizeMib} MiB to null:, 1 connection`,
      unit: "s",
      target: "image",
      run: (uri) => nbdcopyOnce(uri, ["--connections=1"]),
    },
    fioTest("fio randread 4 KiB QD32", { rw: "randread", bs: "4k", iodepth: 32 }, "IOPS", "origin"),
    fioTest("fio randread 4 KiB QD1", { rw: "randread", bs: "4k", iodepth: 1 }, "IOPS", "origin"),
    fioTest("fio randwrite 4 KiB QD32", { rw: "randwrite", bs: "4k", iodepth: 32 }, "IOPS", "origin"),
    fioTest("fio write 256 KiB QD16", { rw: "write", bs: "256k", iodepth: 16 }, "MiB/s", "origin"),
    fioTest(
      "fio randwrite 4 KiB QD32, snapshot held (64 KiB chunks, first touch)",
      { rw: "randwrite", bs: "4k", iodepth: 32 },
      "IOPS",
      "origin with snapshot held",
    ),
  ];
  const tests = allTests.filter((entry) => entry.test.includes(options.only));
  const peers: Server[] = [];
  try {
    peers.push(await startNbdkit(file, options.directory));
    peers.push(await startQemuNbd(file, options.directory));
    for (const entry of tests) {
      const values = new Map<string, number>();
      // A fresh server of ours per row: the image row and the held-snapshot row start from a new snapshot.
      const ours = await startOurs(file, options.directory, entry.target !== "origin");
      try {
        const uri = entry.target === "origin with snapshot held" ? ours.originUri! : ours.uri;
        if (entry.unit === "s") {
          const uris = new Map([
            [ours.name, uri],
            ...peers.map((peer): [string, string] => [peer.name, peer.uri]),
          ]);
          for (const [name, value] of await nbdcopyInterleaved(uris, 5, entry.run)) values.set(name, value);
        } else {
          values.set(ours.name, await entry.run(uri));
        }
      } finally {
        await ours.stop();
      }
      if (entry.unit !== "s")
        for (const server of peers) values.set(server.name, await entry.run(server.uri));
      for (const [name, value] of values)
        console.error(`${entry.test}: ${name} ${format(value, entry.unit)} ${entry.unit}`);
      measurements.push({ test: `${entry.test} [ours: ${entry.target}]`, unit: entry.unit, values });
    }
  } finally {
    for (const server of peers) await server.stop();
  }
  const servers = ["blocksnap", ...peers.map((server) => server.name)];
  const cacheAfter = await pageCacheReport(file);
  const versions = await Promise.all([
    exec("nbdkit", ["--version"]).then((result) => result.stdout.trim()),
    exec("qemu-nbd", ["--version"]).then((result) => result.stdout.split("\n")[0]?.trim() ?? ""),
    exec("nbdcopy", ["--version"]).then((result) => result.stdout.split("\n")[0]?.trim() ?? ""),
    exec("fio", ["--version"]).then((result) => result.stdout.trim()),
  ]);
  const markdown = [
    "# NBD benchmark",
    "",
    `Machine: ${availableParallelism()} × ${cpus()[0]?.model ?? "cpu"}, ${(totalmem() / 2 ** 30).toFixed(0)} GiB;` +
      ` Node ${process.version}; ${versions.join("; ")}.`,
    `File: ${options.sizeMib} MiB of random data, page cache before: ${cacheBefore}, after: ${cacheAfter}; ${cacheShape}.`,
    `Unix sockets; fio runs of ${options.runtimeSeconds} s, one job (one connection); nbdcopy with its defaults` +
      " (4 connections, multi-conn) and with --connections=1: a warm-up copy per server, then 5 rounds alternating between the servers, median.",
    "Ratios: blocksnap relative to the peer, above 1× means blocksnap is faster. blocksnap runs its full stack" +
      " (Engine, Tracker with CBT, CheckedDevice, NBD); [ours: …] names the export measured — the image of a" +
      " freshly taken snapshot, or the origin, plain or with a snapshot held. The peers serve the plain file.",
    "",
    table(measurements, servers),
    "",
  ].join("\n");
  console.log(markdown);
  const resultsDirectory = join(repositoryRoot(), "bench", "results");
  fs.mkdirSync(resultsDirectory, { recursive: true });
  fs.writeFileSync(join(resultsDirectory, "nbd.md"), markdown);
  console.error(`written to ${join(resultsDirectory, "nbd.md")}`);
}

await main();

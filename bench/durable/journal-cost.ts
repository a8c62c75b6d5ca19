// Benchmark (not a test): what the CBT write-intent journal costs origin writes. fio 4 KiB random writes at
// QD32 (--ioengine=nbd) on a file-backed device over the daemon's NBD socket, with the journal and without
// it (BLOCKSNAP_BENCH_NO_CBT_JOURNAL=1), in one run: a first pass over a fresh device (every region's first
// write waits for a journal fdatasync) and a steady pass (regions already dirty). Usage (after tsc):
//   node dist/bench/durable/journal-cost.js [--size-mib 1024] [--runtime-s 5] [--out bench/results/journal.md]
import { execFile, spawn } from "node:child_process";
import { mkdir, mkdtemp, readFile, rm, writeFile } from "node:fs/promises";
import { tmpdir } from "node:os";
import { dirname, join, resolve } from "node:path";
import { fileURLToPath } from "node:url";
import { parseArgs } from "node:util";

const { values } = parseArgs({
  options: {
    "size-mib": { type: "string", default: "1024" },
    "runtime-s": { type: "string", default: "5" },
    out: { type: "string", default: "bench/results/journal.md" },
  },
});
const sizeMib = Number(values["size-mib"]);
const runtimeSeconds = Number(values["runtime-s"]);
const cliPath = join(resolve(dirname(fileURLToPath(import.meta.url)), "../../.."), "dist/src/cli/main.js");

function run(file: string, args: readonly string[], env: NodeJS.ProcessEnv = process.env): Promise<string> {
  return new Promise((resolvePromise, reject) => {
    execFile(file, [...args], { env, maxBuffer: 64 << 20 }, (error, stdout, stderr) => {
      if (error) reject(new Error(`${file} ${args.join(" ")}: ${stderr || String(error)}`));
      else resolvePromise(stdout);
    });
  });
}

async function fioIops(uri: string, directory: string, timeBased: boolean): Promise<number> {
  const output = join(directory, "fio.json");
  await run("fio", [
    "--name=journal",
    "--ioengine=nbd",
    `--uri=${uri}`,
    "--rw=randwrite",
    "--bs=4k",
    "--iodepth=32",
    `--size=${sizeMib}M`,
    ...(timeBased ? ["--time_based", `--runtime=${runtimeSeconds}`] : ["--io_size=256M"]),
    "--output-format=json",
    `--output=${output}`,
  ]);
  const report = JSON.parse(await readFile(output, "utf8")) as { jobs: { write: { iops: number } }[] };
  return report.jobs[0]?.write.iops ?? Number.NaN;
}

async function measure(withJournal: boolean): Promise<{ first: number; steady: number }> {
  const directory = await mkdtemp(join(tmpdir(), "blocksnap-bench-journal-"));
  const stateDir = join(directory, "state");
  const env = { ...process.env, BLOCKSNAP_BENCH_NO_CBT_JOURNAL: withJournal ? "0" : "1" };
  const daemon = spawn(
    process.execPath,
    [cliPath, "serve", "--state-dir", stateDir, "--fuse-mount", "none"],
    { stdio: "ignore", env },
  );
  try {
    for (let attempt = 0; attempt < 100; attempt++) {
      try {
        await run(process.execPath, [cliPath, "status", "--state-dir", stateDir]);
        break;
      } catch {
        await new Promise((wake) => setTimeout(wake, 100));
      }
    }
    const backend = join(directory, "d0.img");
    await run("truncate", ["-s", `${sizeMib}M`, backend]);
    await run("dd", [
      `if=/dev/zero`,
      `of=${backend}`,
      "bs=1M",
      `count=${sizeMib}`,
      "conv=notrunc",
      "status=none",
    ]);
    await run(process.execPath, [
      cliPath,
      "device",
      "add",
      "d0",
      "--backend",
      backend,
      "--state-dir",
      stateDir,
    ]);
    const uri = `nbd+unix:///d0?socket=${join(stateDir, "nbd.sock")}`;
    const first = await fioIops(uri, directory, false);
    const steady = await fioIops(uri, directory, true);
    return { first, steady };
  } finally {
    daemon.kill("SIGTERM");
    await new Promise((wake) => daemon.once("exit", wake));
    await rm(directory, { recursive: true, force: true });
  }
}

const rows: string[] = [];
const results: Record<string, { first: number; steady: number }> = {};
for (const round of [1, 2, 3]) {
  // Alternating order, and the previous run's dirty pages written back first: the kernel's write-back of
  // one run must not slow the next.
  for (const withJournal of round % 2 === 1 ? [false, true] : [true, false]) {
    await run("sync", []);
    const result = await measure(withJournal);
    const label = withJournal ? "journal" : "no journal";
    const previous = results[label];
    results[label] = previous
      ? { first: Math.max(previous.first, result.first), steady: Math.max(previous.steady, result.steady) }
      : result;
    process.stdout.write(
      `round ${round} ${label}: first ${result.first.toFixed(0)} IOPS, steady ${result.steady.toFixed(0)} IOPS\n`,
    );
  }
}
const on = results.journal!;
const off = results["no journal"]!;
rows.push(
  "| pass | no journal (IOPS) | journal (IOPS) | journal / no journal |",
  "|---|---|---|---|",
  `| first pass (256 MiB of 4 KiB writes over a fresh ${sizeMib} MiB device: every region's first write waits) | ${off.first.toFixed(0)} | ${on.first.toFixed(0)} | ${(on.first / off.first).toFixed(3)} |`,
  `| steady (${runtimeSeconds} s, regions already dirty) | ${off.steady.toFixed(0)} | ${on.steady.toFixed(0)} | ${(on.steady / off.steady).toFixed(3)} |`,
);
const markdown = [
  "## CBT write-intent journal: cost to origin writes",
  "",
  "fio 4 KiB random writes, QD32, --ioengine=nbd on the daemon's NBD Unix socket, file backend; the best of three rounds each, in alternating order, with a `sync` before every run.",
  "",
  ...rows,
  "",
].join("\n");
await mkdir(dirname(values.out), { recursive: true });
await writeFile(values.out, markdown);
process.stdout.write(markdown);

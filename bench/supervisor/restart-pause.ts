// Benchmark (not a test): the longest I/O pause a writer sees when the engine of `blocksnap serve
// --supervise` dies (SIGKILL) or is restarted on purpose (`blocksnap restart`). fio writes 4 KiB at random
// (QD1 and QD16, O_DIRECT) to a loop device over a device's FUSE file; each round runs fio for
// --runtime-s seconds with one event in the middle, and the slowest completion of that round is the pause
// (engine start and state recovery included). Rounds without an event give the baseline. Root only.
// Usage (from the repository root, after tsc):
//   node dist/bench/supervisor/restart-pause.js [--rounds 5] [--runtime-s 3] [--out bench/results/supervisor.md]
import { execFile, spawn } from "node:child_process";
import { mkdir, mkdtemp, rm, writeFile } from "node:fs/promises";
import { tmpdir } from "node:os";
import { dirname, join, resolve } from "node:path";
import { fileURLToPath } from "node:url";
import { parseArgs } from "node:util";

const { values } = parseArgs({
  options: {
    rounds: { type: "string", default: "5" },
    "runtime-s": { type: "string", default: "3" },
    out: { type: "string", default: "bench/results/supervisor.md" },
  },
});
const rounds = Number(values.rounds);
const runtimeSeconds = Number(values["runtime-s"]);
const repositoryRoot = resolve(dirname(fileURLToPath(import.meta.url)), "../../..");
const cliPath = join(repositoryRoot, "dist/src/cli/main.js");

type Event = "none" | "kill -9" | "blocksnap restart";

function run(file: string, args: readonly string[]): Promise<string> {
  return new Promise((resolvePromise, reject) => {
    execFile(file, [...args], { maxBuffer: 64 << 20 }, (error, stdout, stderr) => {
      if (error) reject(new Error(`${file} ${args.join(" ")}: ${stderr || String(error)}`));
      else resolvePromise(stdout);
    });
  });
}

async function waitForSocket(stateDir: string): Promise<void> {
  for (let attempt = 0; attempt < 100; attempt++) {
    try {
      await run(process.execPath, [cliPath, "status", "--state-dir", stateDir]);
      return;
    } catch {
      await new Promise((wake) => setTimeout(wake, 100));
    }
  }
  throw new Error("the daemon did not start");
}

/** The engine's pid as status reports it (the supervisor also keeps a loaded standby child). */
async function enginePid(stateDir: string): Promise<number> {
  const status = JSON.parse(
    await run(process.execPath, [cliPath, "status", "--json", "--state-dir", stateDir]),
  ) as {
    pid: number;
  };
  return status.pid;
}

/** The slowest write completion of one fio run, in ms, with `event` fired halfway through. */
async function oneRound(loop: string, iodepth: number, event: Event, stateDir: string): Promise<number> {
  const fio = run("fio", [
    "--name=pause",
    `--filename=${loop}`,
    "--rw=randwrite",
    "--bs=4k",
    "--ioengine=libaio",
    `--iodepth=${iodepth}`,
    "--direct=1",
    "--time_based",
    `--runtime=${runtimeSeconds}`,
    "--size=128M",
    "--output-format=json",
  ]);
  await new Promise((wake) => setTimeout(wake, (runtimeSeconds * 1000) / 2));
  if (event === "kill -9") process.kill(await enginePid(stateDir), "SIGKILL");
  if (event === "blocksnap restart")
    await run(process.execPath, [cliPath, "restart", "--state-dir", stateDir]);
  const report = JSON.parse(await fio) as { jobs: { write: { clat_ns: { max: number } } }[] };
  const maxNs = report.jobs[0]?.write.clat_ns.max ?? Number.NaN;
  return maxNs / 1e6;
}

function median(values: readonly number[]): number {
  const sorted = [...values].sort((a, b) => a - b);
  return sorted[Math.floor(sorted.length / 2)] ?? Number.NaN;
}

async function main(): Promise<void> {
  const directory = await mkdtemp(join(tmpdir(), "blocksnap-bench-supervisor-"));
  const stateDir = join(directory, "state");
  const backend = join(directory, "disk0.img");
  await run("truncate", ["-s", "256M", backend]);
  const supervisor = spawn(process.execPath, [cliPath, "serve", "--supervise", "--state-dir", stateDir], {
    stdio: ["ignore", "ignore", "ignore"],
  });
  let loop = "";
  const lines: string[] = [];
  try {
    await waitForSocket(stateDir);
    await run(process.execPath, [
      cliPath,
      "device",
      "add",
      "disk0",
      "--backend",
      backend,
      "--state-dir",
      stateDir,
    ]);
    loop = (await run("losetup", ["-f", "--show", "--direct-io=on", join(stateDir, "mnt", "disk0")])).trim();
    lines.push(
      "| queue depth | event | rounds | median longest write (ms) | max longest write (ms) |",
      "|---|---|---|---|---|",
    );
    for (const iodepth of [1, 16]) {
      for (const event of ["none", "kill -9", "blocksnap restart"] as const) {
        const pauses: number[] = [];
        for (let round = 0; round < rounds; round++) {
          pauses.push(await oneRound(loop, iodepth, event, stateDir));
        }
        const line = `| ${iodepth} | ${event} | ${rounds} | ${median(pauses).toFixed(1)} | ${Math.max(...pauses).toFixed(1)} |`;
        lines.push(line);
        process.stdout.write(`${line}\n`);
      }
    }
  } finally {
    if (loop !== "") await run("losetup", ["-d", loop]).catch(() => "");
    supervisor.kill("SIGTERM");
    await new Promise((wake) => supervisor.once("exit", wake));
    await rm(directory, { recursive: true, force: true });
  }
  const markdown = [
    "## Supervised engine: longest write per restart",
    "",
    `fio 4 KiB random writes, O_DIRECT, on a loop device over a device's FUSE file (256 MiB file backend), ${runtimeSeconds} s per round with one event halfway; the slowest completion of a round is the pause a writer saw. *none*: rounds without an event (the baseline's own worst write).`,
    "",
    ...lines,
    "",
  ].join("\n");
  await mkdir(dirname(values.out), { recursive: true });
  await writeFile(values.out, markdown);
}

await main();

// Benchmark (not a test): fio on a loop device (--direct-io=on) over blocksnap's FUSE file, against the
// same loop + fio over nbdfuse + nbdkit's file plugin, over a C FUSE file server (libfuse's
// passthrough_hp, see below), and against blocksnap's own NBD face (fio --ioengine=nbd on
// bench/nbd/bench-server.js, for the read jobs), on the same page-cache-hot file, in one run. Both
// blocksnap faces serve the full engine stack (origin device over the file); each server runs in its own
// process. Usage (root, from the repository root, after tsc):
//   node dist/bench/fuse/fuse-bench.js [--size-mib 1024] [--runtime-s 5] [--rounds 2] [--fuse-readers 2]
//     [--skip-nbdfuse] [--c-peer PATH] [--c-peer-args "..."] [--only randread] [--out bench/results/fuse.md]
// --fuse-readers 1,2 runs blocksnap's FUSE face once per reader-thread count in every round (alternating).
// --only SUBSTRING runs only the jobs whose label contains it.
//
// Server CPU: every row also gives the server's CPU time per request (user + system of every thread of
// the server processes, /proc/PID/stat, over the fio job, divided by fio's completed requests), which
// other load on the machine disturbs far less than IOPS, and, for the FUSE servers, the same split by
// thread (/proc/PID/task/*/schedstat: threads of one name summed; threads that ended during the job are
// missing from the split, not from the total).
//
// The C peer: libfuse's example/passthrough_hp.cc (low-level API, multithreaded, C++) serving the
// directory that holds the file, built outside the repository by bench/fuse/build-c-peer.sh (which also
// makes it open the backing file without O_DIRECT and its files with FOPEN_DIRECT_IO, as ours does).
// Without the binary the row is skipped with the reason printed.
import { type ChildProcess, execFile, spawn } from "node:child_process";
import { existsSync, readdirSync, readFileSync } from "node:fs";
import { mkdir, mkdtemp, rm, writeFile } from "node:fs/promises";
import { tmpdir } from "node:os";
import { basename, dirname, join, resolve } from "node:path";
import { fileURLToPath } from "node:url";
import { parseArgs } from "node:util";
import { statCpuTicks } from "../core/bench-util.js";

interface Job {
  readonly label: string;
  readonly rw: string;
  readonly blockSize: string;
  readonly iodepth: number;
  /** Also run through blocksnap's NBD face. */
  readonly nbd: boolean;
}

interface Result {
  readonly iops: number;
  readonly bandwidthBytes: number;
  readonly meanLatencyUs: number;
  /** Server CPU time (every process of the server, user + system) per completed request. */
  readonly cpuUsPerRequest: number;
  /** Busy time of the whole machine (fio, loop, kernel, server, anything else running) per request. */
  readonly machineUsPerRequest: number;
  /** The same by thread name (FUSE servers only), with each thread's share, largest first. */
  readonly threadCpuUsPerRequest: ReadonlyArray<ThreadCpu>;
}

interface ThreadCpu {
  readonly name: string;
  readonly usPerRequest: number;
  readonly threadsUsPerRequest: readonly number[];
}

interface Served {
  /** The file (on the FUSE mount) or NBD URI. */
  readonly target: { device: string } | { uri: string };
  /** Server processes whose CPU time is counted. */
  readonly pids: readonly number[];
}

const jobs: readonly Job[] = [
  { label: "randread 4 KiB QD32", rw: "randread", blockSize: "4k", iodepth: 32, nbd: true },
  { label: "read 1 MiB QD8", rw: "read", blockSize: "1M", iodepth: 8, nbd: true },
  { label: "randwrite 4 KiB QD32", rw: "randwrite", blockSize: "4k", iodepth: 32, nbd: false },
  { label: "write 1 MiB QD8", rw: "write", blockSize: "1M", iodepth: 8, nbd: false },
];

/**
 * passthrough_hp's fastest options here (2026-12-04, IOPS and CPU per request): no kernel caching
 * (timeouts 0, like ours); splice(2) on (the same as copies at 4 KiB, 25× faster at 1 MiB, where libfuse
 * copies through a fresh buffer per reply); a cloned /dev/fuse descriptor per thread (a little ahead of
 * one shared descriptor); libfuse's default thread pool (10 threads: --num-threads 2 or --single lose
 * half the IOPS at 4 KiB QD32).
 */
const cPeerDefaultArgs = "--nocache --clone-fd";

const { values } = parseArgs({
  options: {
    "size-mib": { type: "string", default: "1024" },
    "runtime-s": { type: "string", default: "5" },
    rounds: { type: "string", default: "2" },
    "fuse-readers": { type: "string", default: "2" },
    "skip-nbdfuse": { type: "boolean", default: false },
    "c-peer": { type: "string", default: "/tmp/fuse3-peer/passthrough_hp" },
    "c-peer-args": { type: "string", default: cPeerDefaultArgs },
    only: { type: "string", default: "" },
    out: { type: "string", default: "bench/results/fuse.md" },
  },
});
const selectedJobs = jobs.filter((job) => job.label.includes(values.only));
if (selectedJobs.length === 0) throw new Error(`--only ${values.only}: no such job`);
const nbdJobs = selectedJobs.filter((job) => job.nbd);
const sizeMiB = Number(values["size-mib"]);
const runtimeSeconds = Number(values["runtime-s"]);
const rounds = Number(values.rounds);
const readerCounts = values["fuse-readers"].split(",").map(Number);
if (readerCounts.some((count) => !Number.isSafeInteger(count) || count < 1))
  throw new Error("--fuse-readers: a comma-separated list of thread counts");
const withNbdfuse = !values["skip-nbdfuse"];
const cPeerPath = values["c-peer"];
const cPeerArgs = values["c-peer-args"].split(/\s+/).filter((arg) => arg !== "");

function run(file: string, args: readonly string[], timeoutMs = 600_000): Promise<string> {
  return new Promise((resolvePromise, reject) => {
    execFile(file, [...args], { timeout: timeoutMs, maxBuffer: 64 << 20 }, (error, stdout, stderr) => {
      if (error) reject(new Error(`${file} ${args.join(" ")}: ${stderr || String(error)}`));
      else resolvePromise(stdout);
    });
  });
}

/** Waits for a line starting with "ready" (the NBD bench server adds the image name after it). */
function waitForReady(child: ChildProcess): Promise<void> {
  return new Promise((resolvePromise, reject) => {
    let output = "";
    child.stdout?.on("data", (chunk: Buffer) => {
      output += chunk.toString();
      if (/^ready\b.*\n/m.test(output)) resolvePromise();
    });
    child.once("exit", (code) => reject(new Error(`server exited (${code}) before it was ready`)));
  });
}

/** Polls with test(1) in a child: the path may sit on a FUSE mount that is still starting. */
async function waitForFile(path: string, timeoutMs: number, testFlag: "-f" | "-S"): Promise<void> {
  const deadline = Date.now() + timeoutMs;
  for (;;) {
    try {
      await run("test", [testFlag, path], 5_000);
      return;
    } catch {
      if (Date.now() > deadline) throw new Error(`${path} did not appear`);
      await new Promise((r) => setTimeout(r, 100));
    }
  }
}

/** CPU time of a process (every thread, also ended ones) in µs: utime + stime of /proc/PID/stat. */
function processCpuUs(pid: number): number {
  return (statCpuTicks(`/proc/${pid}/stat`) * 1e6) / clockTicksPerSecond;
}

/** Run time in ns of every live thread of `pid`, by thread id, with its name. */
function threadRunTimes(pid: number): Map<string, { name: string; runNs: number }> {
  const times = new Map<string, { name: string; runNs: number }>();
  let tids: string[];
  try {
    tids = readdirSync(`/proc/${pid}/task`);
  } catch {
    return times;
  }
  for (const tid of tids) {
    try {
      const name = readFileSync(`/proc/${pid}/task/${tid}/comm`, "utf8").trim();
      const runNs = Number(readFileSync(`/proc/${pid}/task/${tid}/schedstat`, "utf8").split(" ")[0]);
      // The main thread by its role: Node names every thread "node".
      times.set(`${pid}/${tid}`, { name: tid === String(pid) ? `${name} main` : name, runNs });
    } catch {
      // The thread ended meanwhile.
    }
  }
  return times;
}

const clockTicksPerSecond = 100;

/** Busy CPU time of the whole machine in µs (/proc/stat: every state but idle and iowait). */
function machineBusyUs(): number {
  const line = readFileSync("/proc/stat", "utf8").split("\n")[0]!;
  const [user, nice, system, , , irq, softirq, steal] = line.split(/\s+/).slice(1).map(Number);
  return ((user! + nice! + system! + irq! + softirq! + steal!) * 1e6) / clockTicksPerSecond;
}

/** fio --ioengine=libaio --direct=1 on a block device, or --ioengine=nbd on an NBD URI. */
async function fio(served: Served, job: Job, splitThreads: boolean): Promise<Result> {
  const { target, pids } = served;
  const engine =
    "device" in target
      ? ["--ioengine=libaio", "--direct=1", `--filename=${target.device}`]
      : ["--ioengine=nbd", `--uri=${target.uri}`, `--size=${sizeMiB}M`];
  const cpuBeforeUs = pids.reduce((sum, pid) => sum + processCpuUs(pid), 0);
  const machineBeforeUs = machineBusyUs();
  const threadsBefore = splitThreads ? pids.map(threadRunTimes) : [];
  const output = await run("fio", [
    `--name=${job.rw}`,
    ...engine,
    `--rw=${job.rw}`,
    `--bs=${job.blockSize}`,
    `--iodepth=${job.iodepth}`,
    `--runtime=${runtimeSeconds}`,
    "--time_based",
    "--output-format=json",
  ]);
  const cpuUs = pids.reduce((sum, pid) => sum + processCpuUs(pid), 0) - cpuBeforeUs;
  const machineUs = machineBusyUs() - machineBeforeUs;
  const threadsAfter = splitThreads ? pids.map(threadRunTimes) : [];
  // fio --ioengine=nbd may print libnbd notes before the JSON.
  const parsed = JSON.parse(output.slice(output.indexOf("{"))) as {
    jobs: Array<
      { error: number } & Record<
        "read" | "write",
        { iops: number; bw_bytes: number; total_ios: number; clat_ns: { mean: number } }
      >
    >;
  };
  const result = parsed.jobs[0]!;
  if (result.error !== 0) throw new Error(`fio ${job.label} reported error ${result.error}`);
  const stats = result[job.rw.includes("write") ? "write" : "read"];
  const requests = Math.max(1, stats.total_ios);
  const byName = new Map<string, number[]>();
  threadsAfter.forEach((after, index) => {
    const before = threadsBefore[index]!;
    for (const [key, { name, runNs }] of after) {
      const deltaNs = runNs - (before.get(key)?.runNs ?? 0);
      // Threads idle through the whole job are left out.
      if (deltaNs <= 0) continue;
      byName.set(name, [...(byName.get(name) ?? []), deltaNs]);
    }
  });
  const perRequestUs = (ns: number) => ns / 1000 / requests;
  const sum = (values: readonly number[]) => values.reduce((a, b) => a + b, 0);
  return {
    iops: stats.iops,
    bandwidthBytes: stats.bw_bytes,
    meanLatencyUs: stats.clat_ns.mean / 1000,
    cpuUsPerRequest: cpuUs / requests,
    machineUsPerRequest: machineUs / requests,
    threadCpuUsPerRequest: [...byName]
      .sort((a, b) => sum(b[1]) - sum(a[1]))
      .map(([name, times]) => ({
        name,
        usPerRequest: perRequestUs(sum(times)),
        threadsUsPerRequest: times.sort((a, b) => b - a).map(perRequestUs),
      })),
  };
}

/** Attaches a loop device over the served file, runs every job, detaches. */
async function runJobs(file: string, pids: readonly number[]): Promise<Result[]> {
  const loop = (await run("losetup", ["--direct-io=on", "-f", "--show", file])).trim();
  try {
    const results: Result[] = [];
    for (const job of selectedJobs) results.push(await fio({ target: { device: loop }, pids }, job, true));
    return results;
  } finally {
    await run("losetup", ["-d", loop]);
  }
}

async function benchBlocksnap(directory: string, backing: string, readerThreads: number): Promise<Result[]> {
  const mountDir = join(directory, "blocksnap");
  const script = join(dirname(fileURLToPath(import.meta.url)), "fuse-bench-server.js");
  const server = spawn(process.execPath, [script, mountDir, "disk0", backing, String(readerThreads)], {
    stdio: ["ignore", "pipe", "inherit"],
  });
  try {
    await waitForReady(server);
    return await runJobs(join(mountDir, "disk0"), [server.pid!]);
  } finally {
    const exited = new Promise((r) => server.once("exit", r));
    server.kill("SIGTERM");
    await exited;
  }
}

/** blocksnap's NBD face on the same file: bench/nbd/bench-server.js, fio --ioengine=nbd, read jobs only. */
async function benchNbdFace(directory: string, backing: string, round: number): Promise<Result[]> {
  const socket = join(directory, `blocksnap-nbd-${round}.sock`);
  const script = join(dirname(fileURLToPath(import.meta.url)), "..", "nbd", "bench-server.js");
  const server = spawn(process.execPath, [script, backing, socket], { stdio: ["ignore", "pipe", "inherit"] });
  const exited = exitOf(server);
  try {
    await waitForReady(server);
    const results: Result[] = [];
    const served: Served = { target: { uri: `nbd+unix:///disk?socket=${socket}` }, pids: [server.pid!] };
    for (const job of nbdJobs) results.push(await fio(served, job, false));
    return results;
  } finally {
    server.kill("SIGTERM");
    await exited;
  }
}

/**
 * The C peer: passthrough_hp mirrors the directory of the backing file at a mount point of its own, and
 * the loop device goes over the mirrored file.
 */
async function benchCPeer(directory: string, backing: string, round: number): Promise<Result[]> {
  const mountDir = join(directory, `c-peer-${round}`);
  await mkdir(mountDir, { recursive: true });
  const server = spawn(cPeerPath, [...cPeerArgs, "--foreground", dirname(backing), mountDir], {
    stdio: ["ignore", "inherit", "inherit"],
  });
  const exited = exitOf(server);
  try {
    await waitForFile(join(mountDir, basename(backing)), 10_000, "-f");
    return await runJobs(join(mountDir, basename(backing)), [server.pid!]);
  } finally {
    // passthrough_hp exits once its file system is unmounted.
    const unmounted = await run("umount", [mountDir]).then(
      () => true,
      (error: unknown) => {
        process.stderr.write(`${String(error)}\n`);
        return false;
      },
    );
    if (!unmounted) server.kill("SIGTERM");
    await exited;
  }
}

async function benchNbdfuse(directory: string, backing: string, round: number): Promise<Result[]> {
  // Fresh names per round: nbdkit may leave its socket file behind when it is terminated.
  const socket = join(directory, `nbdkit-${round}.sock`);
  const mountDir = join(directory, `nbdfuse-${round}`);
  await mkdir(mountDir, { recursive: true });
  const nbdkit = spawn("nbdkit", ["-f", "-U", socket, "file", backing], {
    stdio: ["ignore", "inherit", "inherit"],
  });
  const nbdkitExited = exitOf(nbdkit);
  await waitForFile(socket, 10_000, "-S");
  const nbdfuse = spawn("nbdfuse", [join(mountDir, "disk0"), "--unix", socket], {
    stdio: ["ignore", "inherit", "inherit"],
  });
  const nbdfuseExited = exitOf(nbdfuse);
  try {
    await waitForFile(join(mountDir, "disk0"), 10_000, "-f");
    return await runJobs(join(mountDir, "disk0"), [nbdfuse.pid!, nbdkit.pid!]);
  } finally {
    // nbdfuse exits once its file system is unmounted.
    const unmounted = await run("umount", [mountDir]).then(
      () => true,
      (error: unknown) => {
        process.stderr.write(`${String(error)}\n`);
        return false;
      },
    );
    if (!unmounted) nbdfuse.kill("SIGTERM");
    await nbdfuseExited;
    nbdkit.kill("SIGTERM");
    await nbdkitExited;
  }
}

function exitOf(child: ChildProcess): Promise<void> {
  return new Promise((resolvePromise) => {
    if (child.exitCode !== null || child.signalCode !== null) resolvePromise();
    else child.once("exit", () => resolvePromise());
  });
}

function best(results: readonly Result[][], index: number): Result {
  return results.map((round) => round[index]!).reduce((a, b) => (b.iops > a.iops ? b : a));
}

function formatResult(result: Result): string {
  const mib = result.bandwidthBytes / 1024 / 1024;
  return `${Math.round(result.iops).toLocaleString("en-US")} IOPS, ${mib.toFixed(0)} MiB/s, ${result.meanLatencyUs.toFixed(0)} µs, CPU ${result.cpuUsPerRequest.toFixed(1)} µs/req (machine ${result.machineUsPerRequest.toFixed(1)})`;
}

function formatThreads(result: Result): string {
  return result.threadCpuUsPerRequest
    .map(({ name, usPerRequest, threadsUsPerRequest }) => {
      if (threadsUsPerRequest.length === 1) return `${name} ${usPerRequest.toFixed(1)}`;
      const shown = threadsUsPerRequest.slice(0, 4).map((us) => us.toFixed(1));
      if (threadsUsPerRequest.length > 4) shown.push("…");
      return `${name} ×${threadsUsPerRequest.length} ${usPerRequest.toFixed(1)} (${shown.join(", ")})`;
    })
    .join("; ");
}

/** A row of the table: a label and its results by round. */
interface Row {
  readonly label: string;
  readonly rounds: Result[][];
  /** Runs only the jobs of nbdJobs. */
  readonly nbdOnly: boolean;
}

async function main(): Promise<void> {
  if (process.getuid?.() !== 0) throw new Error("the FUSE benchmark needs root (mount, losetup)");
  const cPeerMissing = existsSync(cPeerPath) ? undefined : `${cPeerPath} not found (build: see the header)`;
  if (cPeerMissing) process.stderr.write(`skipping the C FUSE server row: ${cPeerMissing}\n`);
  const directory = await mkdtemp(join(tmpdir(), "blocksnap-fuse-bench-"));
  try {
    const loadBefore = (await run("cat", ["/proc/loadavg"])).split(" ").slice(0, 3).join(" ");
    // Alone in its directory: the C peer mirrors that directory.
    const backingDirectory = join(directory, "backing");
    await mkdir(backingDirectory);
    const backing = join(backingDirectory, "disk.img");
    await run("dd", ["if=/dev/urandom", `of=${backing}`, "bs=1M", `count=${sizeMiB}`, "status=none"]);
    await run("dd", [`if=${backing}`, "of=/dev/null", "bs=1M", "status=none"]);
    const cached = (
      await run("fincore", ["--bytes", "--noheadings", "-o", "RES", backing]).catch(() => "?")
    ).trim();
    const fuseLabel = (count: number) =>
      readerCounts.length > 1 ? `blocksnap FUSE, ${count} reader(s)` : "blocksnap FUSE";
    const ours: Row[] = readerCounts.map((count) => ({
      label: fuseLabel(count),
      rounds: [],
      nbdOnly: false,
    }));
    const nbdFace: Row = { label: "blocksnap NBD", rounds: [], nbdOnly: true };
    const cPeer: Row = { label: "C FUSE (passthrough_hp)", rounds: [], nbdOnly: false };
    const nbdfuse: Row = { label: "nbdfuse + nbdkit file", rounds: [], nbdOnly: false };
    const loads: string[] = [];
    for (let round = 0; round < rounds; round += 1) {
      for (const [index, count] of readerCounts.entries()) {
        ours[index]!.rounds.push(await benchBlocksnap(directory, backing, count));
      }
      if (nbdJobs.length > 0) nbdFace.rounds.push(await benchNbdFace(directory, backing, round));
      if (!cPeerMissing) cPeer.rounds.push(await benchCPeer(directory, backing, round));
      if (withNbdfuse) nbdfuse.rounds.push(await benchNbdfuse(directory, backing, round));
      loads.push((await run("cat", ["/proc/loadavg"])).split(" ")[0]!);
    }
    const rows = [...ours, nbdFace, cPeer, nbdfuse].filter((row) => row.rounds.length > 0);
    const resultOf = (row: Row, job: Job, round?: number): Result | undefined => {
      const index = (row.nbdOnly ? nbdJobs : selectedJobs).indexOf(job);
      if (index < 0) return undefined;
      return round === undefined ? best(row.rounds, index) : row.rounds[round]![index];
    };
    const ratioColumns: Array<{ label: string; of: Row; to: Row }> = [];
    for (const row of ours) {
      if (nbdFace.rounds.length > 0) ratioColumns.push({ label: `${row.label} / NBD`, of: row, to: nbdFace });
      if (cPeer.rounds.length > 0) ratioColumns.push({ label: `${row.label} / C FUSE`, of: row, to: cPeer });
    }
    if (cPeer.rounds.length > 0 && nbdFace.rounds.length > 0)
      ratioColumns.push({ label: "C FUSE / NBD", of: cPeer, to: nbdFace });
    if (nbdfuse.rounds.length > 0)
      for (const row of ours) ratioColumns.push({ label: `${row.label} / nbdfuse`, of: row, to: nbdfuse });
    const lines = [
      "# FUSE face: blocksnap FUSE vs blocksnap NBD vs a C FUSE server vs nbdfuse + nbdkit file",
      "",
      `Generated by bench/fuse/fuse-bench.ts on ${new Date().toISOString()} (kernel ${(await run("uname", ["-r"])).trim()}, node ${process.version}, load average before: ${loadBefore}).`,
      `Backing file: ${sizeMiB} MiB of random data, ${cached} bytes in the page cache before the runs.`,
      `FUSE rows: \`losetup --direct-io=on\` over the FUSE file, then \`fio --ioengine=libaio --direct=1\`, ${runtimeSeconds} s.`,
      "blocksnap NBD: `fio --ioengine=nbd` on a Unix socket to bench/nbd/bench-server.js (read jobs only).",
      "Both blocksnap faces serve the same stack: Engine origin device (tracker + CBT) over a FileBackend on the file.",
      cPeerMissing
        ? `C FUSE server: skipped, ${cPeerMissing}.`
        : `C FUSE server: \`${basename(cPeerPath)} ${cPeerArgs.join(" ")}\` (libfuse example, multithreaded) mirroring the backing file's directory.`,
      `Best of ${rounds} alternating rounds (FUSE reader threads: ${readerCounts.join(", ")}; load average after each round: ${loads.join(", ")}). Every server runs in its own process on the same 2 cores as fio.`,
      "CPU: the server processes' user + system time per completed request over the fio job; in brackets the whole machine's busy time per request (fio, loop, kernel and anything else running).",
      "",
      `| job | ${rows.map((row) => row.label).join(" | ")} | ${ratioColumns.map((column) => `${column.label} (IOPS)`).join(" | ")} |`,
      `|---|${rows.map(() => "---|").join("")}${ratioColumns.map(() => "---|").join("")}`,
    ];
    for (const job of selectedJobs) {
      const cells = [job.label];
      for (const row of rows) {
        const result = resultOf(row, job);
        cells.push(result ? formatResult(result) : "—");
      }
      for (const { of, to } of ratioColumns) {
        const a = resultOf(of, job);
        const b = resultOf(to, job);
        cells.push(a && b ? `${(a.iops / b.iops).toFixed(2)}×` : "—");
      }
      lines.push(`| ${cells.join(" | ")} |`);
    }
    lines.push("", "Server CPU per request by thread (µs; threads of one name summed, best round):", "");
    for (const job of selectedJobs) {
      for (const row of rows) {
        const result = resultOf(row, job);
        if (result && result.threadCpuUsPerRequest.length > 0)
          lines.push(`- ${job.label}, ${row.label}: ${formatThreads(result)}`);
      }
    }
    lines.push("", "Every round:", "");
    for (let round = 0; round < rounds; round += 1) {
      for (const job of selectedJobs) {
        const cells = rows.flatMap((row) => {
          const result = resultOf(row, job, round);
          return result ? [`${row.label} ${formatResult(result)}`] : [];
        });
        lines.push(`- round ${round + 1}, ${job.label}: ${cells.join("; ")}`);
      }
    }
    const markdown = `${lines.join("\n")}\n`;
    const out = resolve(values.out);
    await mkdir(dirname(out), { recursive: true });
    await writeFile(out, markdown);
    process.stdout.write(markdown);
  } finally {
    await rm(directory, { recursive: true, force: true });
  }
}

await main();

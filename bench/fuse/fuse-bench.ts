// Benchmark (not a test): fio on a loop device (--direct-io=on) over blocksnap's FUSE file, against the
// same loop + fio over nbdfuse + nbdkit's file plugin, and against blocksnap's own NBD face (fio
// --ioengine=nbd on bench/nbd/bench-server.js, for the read jobs), on the same page-cache-hot file, in one
// run. Both blocksnap faces serve the full engine stack (origin device over the file); each server runs in
// its own process. Usage (root, from the repository root, after tsc):
//   node dist/bench/fuse/fuse-bench.js [--size-mib 1024] [--runtime-s 5] [--rounds 2] [--fuse-readers 2]
//     [--skip-nbdfuse] [--out bench/results/fuse.md]
// --fuse-readers 1,2 runs blocksnap's FUSE face once per reader-thread count in every round (alternating).
import { type ChildProcess, execFile, spawn } from "node:child_process";
import { mkdir, mkdtemp, rm, writeFile } from "node:fs/promises";
import { tmpdir } from "node:os";
import { dirname, join, resolve } from "node:path";
import { fileURLToPath } from "node:url";
import { parseArgs } from "node:util";

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
}

const jobs: readonly Job[] = [
  { label: "randread 4 KiB QD32", rw: "randread", blockSize: "4k", iodepth: 32, nbd: true },
  { label: "read 1 MiB QD8", rw: "read", blockSize: "1M", iodepth: 8, nbd: true },
  { label: "randwrite 4 KiB QD32", rw: "randwrite", blockSize: "4k", iodepth: 32, nbd: false },
  { label: "write 1 MiB QD8", rw: "write", blockSize: "1M", iodepth: 8, nbd: false },
];

const { values } = parseArgs({
  options: {
    "size-mib": { type: "string", default: "1024" },
    "runtime-s": { type: "string", default: "5" },
    rounds: { type: "string", default: "2" },
    "fuse-readers": { type: "string", default: "2" },
    "skip-nbdfuse": { type: "boolean", default: false },
    out: { type: "string", default: "bench/results/fuse.md" },
  },
});
const nbdJobs = jobs.filter((job) => job.nbd);
const sizeMiB = Number(values["size-mib"]);
const runtimeSeconds = Number(values["runtime-s"]);
const rounds = Number(values.rounds);
const readerCounts = values["fuse-readers"].split(",").map(Number);
if (readerCounts.some((count) => !Number.isSafeInteger(count) || count < 1))
  throw new Error("--fuse-readers: a comma-separated list of thread counts");
const withNbdfuse = !values["skip-nbdfuse"];

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

/** fio --ioengine=libaio --direct=1 on a block device, or --ioengine=nbd on an NBD URI. */
async function fio(target: { device: string } | { uri: string }, job: Job): Promise<Result> {
  const engine =
    "device" in target
      ? ["--ioengine=libaio", "--direct=1", `--filename=${target.device}`]
      : ["--ioengine=nbd", `--uri=${target.uri}`, `--size=${sizeMiB}M`];
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
  // fio --ioengine=nbd may print libnbd notes before the JSON.
  const parsed = JSON.parse(output.slice(output.indexOf("{"))) as {
    jobs: Array<
      { error: number } & Record<
        "read" | "write",
        { iops: number; bw_bytes: number; clat_ns: { mean: number } }
      >
    >;
  };
  const result = parsed.jobs[0]!;
  if (result.error !== 0) throw new Error(`fio ${job.label} reported error ${result.error}`);
  const stats = result[job.rw.includes("write") ? "write" : "read"];
  return { iops: stats.iops, bandwidthBytes: stats.bw_bytes, meanLatencyUs: stats.clat_ns.mean / 1000 };
}

/** Attaches a loop device over `file`, runs every job, detaches. */
async function runJobs(file: string): Promise<Result[]> {
  const loop = (await run("losetup", ["--direct-io=on", "-f", "--show", file])).trim();
  try {
    const results: Result[] = [];
    for (const job of jobs) results.push(await fio({ device: loop }, job));
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
    return await runJobs(join(mountDir, "disk0"));
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
    for (const job of nbdJobs) results.push(await fio({ uri: `nbd+unix:///disk?socket=${socket}` }, job));
    return results;
  } finally {
    server.kill("SIGTERM");
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
    return await runJobs(join(mountDir, "disk0"));
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
  return `${Math.round(result.iops).toLocaleString("en-US")} IOPS, ${mib.toFixed(0)} MiB/s, ${result.meanLatencyUs.toFixed(0)} µs`;
}

async function main(): Promise<void> {
  if (process.getuid?.() !== 0) throw new Error("the FUSE benchmark needs root (mount, losetup)");
  const directory = await mkdtemp(join(tmpdir(), "blocksnap-fuse-bench-"));
  try {
    const loadBefore = (await run("cat", ["/proc/loadavg"])).split(" ").slice(0, 3).join(" ");
    const backing = join(directory, "disk.img");
    await run("dd", ["if=/dev/urandom", `of=${backing}`, "bs=1M", `count=${sizeMiB}`, "status=none"]);
    await run("dd", [`if=${backing}`, "of=/dev/null", "bs=1M", "status=none"]);
    const cached = (
      await run("fincore", ["--bytes", "--noheadings", "-o", "RES", backing]).catch(() => "?")
    ).trim();
    // ours[readerIndex][round][job]
    const ours: Result[][][] = readerCounts.map(() => []);
    const nbdFace: Result[][] = [];
    const peer: Result[][] = [];
    const loads: string[] = [];
    for (let round = 0; round < rounds; round += 1) {
      for (const [index, count] of readerCounts.entries()) {
        ours[index]!.push(await benchBlocksnap(directory, backing, count));
      }
      nbdFace.push(await benchNbdFace(directory, backing, round));
      if (withNbdfuse) peer.push(await benchNbdfuse(directory, backing, round));
      loads.push((await run("cat", ["/proc/loadavg"])).split(" ")[0]!);
    }
    const fuseLabel = (index: number) =>
      readerCounts.length > 1 ? `blocksnap FUSE, ${readerCounts[index]} reader(s)` : "blocksnap FUSE";
    const lines = [
      "# FUSE face: blocksnap FUSE vs blocksnap NBD vs nbdfuse + nbdkit file",
      "",
      `Generated by bench/fuse/fuse-bench.ts on ${new Date().toISOString()} (kernel ${(await run("uname", ["-r"])).trim()}, node ${process.version}, load average before: ${loadBefore}).`,
      `Backing file: ${sizeMiB} MiB of random data, ${cached} bytes in the page cache before the runs.`,
      `FUSE rows: \`losetup --direct-io=on\` over the FUSE file, then \`fio --ioengine=libaio --direct=1\`, ${runtimeSeconds} s.`,
      "blocksnap NBD: `fio --ioengine=nbd` on a Unix socket to bench/nbd/bench-server.js (read jobs only).",
      "Both blocksnap faces serve the same stack: Engine origin device (tracker + CBT) over a FileBackend on the file.",
      `Best of ${rounds} alternating rounds (FUSE reader threads: ${readerCounts.join(", ")}; load average after each round: ${loads.join(", ")}). Every server runs in its own process on the same 2 cores as fio.`,
      "",
      `| job | ${readerCounts.map((_, index) => fuseLabel(index)).join(" | ")} | blocksnap NBD |${withNbdfuse ? " nbdfuse + nbdkit file |" : ""} FUSE / NBD (IOPS) |${withNbdfuse ? " FUSE / nbdfuse (IOPS) |" : ""}`,
      `|---|${readerCounts.map(() => "---|").join("")}---|${withNbdfuse ? "---|" : ""}---|${withNbdfuse ? "---|" : ""}`,
    ];
    const ratios = (results: readonly Result[], other: Result) =>
      results.map((result) => `${(result.iops / other.iops).toFixed(2)}×`).join(" / ");
    jobs.forEach((job, index) => {
      const a = ours.map((perCount) => best(perCount, index));
      const nbdIndex = nbdJobs.indexOf(job);
      const n = nbdIndex >= 0 ? best(nbdFace, nbdIndex) : undefined;
      const cells = [job.label, ...a.map(formatResult), n ? formatResult(n) : "—"];
      if (withNbdfuse) cells.push(formatResult(best(peer, index)));
      cells.push(n ? ratios(a, n) : "—");
      if (withNbdfuse) cells.push(ratios(a, best(peer, index)));
      lines.push(`| ${cells.join(" | ")} |`);
    });
    lines.push("", "Every round:", "");
    for (let round = 0; round < rounds; round += 1) {
      jobs.forEach((job, index) => {
        const nbdIndex = nbdJobs.indexOf(job);
        const fuse = readerCounts
          .map((_, count) => `${fuseLabel(count)} ${formatResult(ours[count]![round]![index]!)}`)
          .join("; ");
        const nbd = nbdIndex >= 0 ? `; blocksnap NBD ${formatResult(nbdFace[round]![nbdIndex]!)}` : "";
        const nbdfuse = withNbdfuse ? `; nbdfuse ${formatResult(peer[round]![index]!)}` : "";
        lines.push(`- round ${round + 1}, ${job.label}: ${fuse}${nbd}${nbdfuse}`);
      });
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

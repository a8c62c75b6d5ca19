/**
 * What the NBD benchmarks share: the servers raced (ours in its own process, nbdkit, qemu-nbd), the
 * page-cache-hot test file, and fio with its nbd engine. Not a benchmark itself.
 */
import { type ChildProcess, execFile, spawn } from "node:child_process";
import { randomBytes } from "node:crypto";
import * as fs from "node:fs";
import { dirname, join } from "node:path";
import { fileURLToPath } from "node:url";
import { median, statCpuTicks } from "../core/bench-util.js";

export interface BenchOptions {
  readonly sizeMib: number;
  readonly runtimeSeconds: number;
  readonly directory: string;
  /** How the test file sits in the page cache (prepareFile); large folios when not given. */
  readonly pageCache?: PageCacheShape;
}

/**
 * The shape of the test file's pages in the page cache. On this kernel (6.18; ext4 with large folios) a
 * 4 KiB buffered write into a large folio costs tens of microseconds of kernel time (ext4_block_write_begin
 * walks every buffer head of the folio) and one into a one-page folio a few, and the shape stays as long as
 * the pages stay cached: a file read or written in large pieces has large folios, one written 4 KiB at a
 * time has small ones. Every server's random-write figure depends on it (nbdkit on the same file, minutes
 * apart: 11–13k and 104–125k IOPS), so the runs set it and say which they used.
 */
export type PageCacheShape = "large" | "small";

/** `--page-cache large|small` (default large). */
export function pageCacheShapeOf(text: string): PageCacheShape {
  if (text === "large" || text === "small") return text;
  throw new Error(`--page-cache must be large or small, not ${JSON.stringify(text)}`);
}

export interface Server {
  readonly name: string;
  /** The export measured: our origin, or with a snapshot its image; the peers' only export. */
  readonly uri: string;
  /** The origin export (differs from `uri` only for our snapshot server). */
  readonly originUri?: string;
  /** The server's process, for its CPU time. */
  readonly pid?: number;
  stop(): Promise<void>;
}

export const here = dirname(fileURLToPath(import.meta.url));

export function exec(
  command: string,
  args: readonly string[],
): Promise<{ code: number; stdout: string; stderr: string }> {
  return new Promise((resolve) => {
    execFile(command, args, { maxBuffer: 64 * 1024 * 1024 }, (error, stdout, stderr) => {
      const code = error ? (typeof error.code === "number" ? error.code : 1) : 0;
      resolve({ code, stdout: String(stdout), stderr: String(stderr) });
    });
  });
}

export async function execOk(command: string, args: readonly string[]): Promise<string> {
  const result = await exec(command, args);
  if (result.code !== 0)
    throw new Error(`${command} ${args.join(" ")}: exit ${result.code}\n${result.stderr}`);
  return result.stdout;
}

/** Calls `probe` every 20 ms, `attempts` times at most, until it gives a value; undefined if it never did. */
async function poll<T>(attempts: number, probe: () => T | undefined): Promise<T | undefined> {
  for (let attempt = 0; attempt < attempts; attempt += 1) {
    const value = probe();
    if (value !== undefined) return value;
    await new Promise((resolve) => setTimeout(resolve, 20));
  }
  return undefined;
}

export async function waitForSocket(path: string, child?: ChildProcess): Promise<void> {
  const found = await poll(500, () => {
    if (fs.existsSync(path)) return true;
    if (child && child.exitCode !== null) throw new Error(`server exited with ${child.exitCode}`);
    return undefined;
  });
  if (found === undefined) throw new Error(`no socket at ${path}`);
}

export async function prepareFile(options: BenchOptions): Promise<string> {
  fs.mkdirSync(options.directory, { recursive: true });
  const path = join(options.directory, "disk.img");
  const sizeBytes = options.sizeMib * 1024 * 1024;
  if (!fs.existsSync(path) || fs.statSync(path).size !== sizeBytes) {
    const fd = fs.openSync(path, "w");
    const chunk = 16 * 1024 * 1024;
    for (let done = 0; done < sizeBytes; done += chunk)
      fs.writeSync(fd, randomBytes(Math.min(chunk, sizeBytes - done)));
    fs.closeSync(fd);
  }
  await shapePageCache(path, sizeBytes, options.pageCache ?? "large");
  return path;
}

/**
 * Drops the file's cached pages (written back first; POSIX_FADV_DONTNEED through dd's nocache flag, which
 * Node cannot call) and brings the whole file back in the wanted shape: large, read in 16 MiB pieces
 * (readahead fills large folios); small, rewritten with fresh random data 4 KiB at a time (a whole-page
 * write into a page not cached makes a one-page folio). Written back again, so every run starts clean.
 */
async function shapePageCache(path: string, sizeBytes: number, shape: PageCacheShape): Promise<void> {
  await execOk("dd", ["if=/dev/null", `of=${path}`, "oflag=nocache", "conv=notrunc,fdatasync", "count=0"]);
  const pieceBytes = 16 * 1024 * 1024;
  const buffer = shape === "large" ? Buffer.allocUnsafe(pieceBytes) : randomBytes(pieceBytes);
  const fd = fs.openSync(path, shape === "large" ? "r" : "r+");
  try {
    for (let offsetBytes = 0; offsetBytes < sizeBytes; offsetBytes += pieceBytes) {
      const lengthBytes = Math.min(pieceBytes, sizeBytes - offsetBytes);
      if (shape === "large") {
        fs.readSync(fd, buffer, 0, lengthBytes, offsetBytes);
        continue;
      }
      for (let doneBytes = 0; doneBytes < lengthBytes; doneBytes += 4096)
        fs.writeSync(fd, buffer, doneBytes, Math.min(4096, lengthBytes - doneBytes), offsetBytes + doneBytes);
    }
    if (shape === "small") fs.fdatasyncSync(fd);
  } finally {
    fs.closeSync(fd);
  }
}

/** For the reports: the shape the runs used, and what a 4 KiB write into it costs. */
export function pageCacheShapeReport(path: string, options: BenchOptions): string {
  const shape = options.pageCache ?? "large";
  const how = shape === "large" ? "read back in 16 MiB pieces" : "rewritten 4 KiB at a time";
  return `${shape} folios (${how}; a synchronous 4 KiB write into them: ${pageCacheWriteMicros(path).toFixed(1)} µs, median)`;
}

/**
 * Microseconds of one 4 KiB write into the test file's cached pages (synchronous, random places, the
 * median of 2000): what the page-cache shape costs every server per write. It rewrites the data it read.
 */
export function pageCacheWriteMicros(path: string): number {
  const fd = fs.openSync(path, "r+");
  try {
    const blockCount = Math.floor(fs.fstatSync(fd).size / 4096);
    const block = Buffer.allocUnsafe(4096);
    const samples: number[] = [];
    for (let index = 0; index < 2000; index++) {
      const positionBytes = Math.floor(Math.random() * blockCount) * 4096;
      fs.readSync(fd, block, 0, 4096, positionBytes);
      const startNs = process.hrtime.bigint();
      fs.writeSync(fd, block, 0, 4096, positionBytes);
      samples.push(Number(process.hrtime.bigint() - startNs) / 1000);
    }
    return median(samples);
  } finally {
    fs.closeSync(fd);
  }
}

export async function pageCacheReport(path: string): Promise<string> {
  const result = await exec("fincore", ["--bytes", "--noheadings", "--output", "RES,SIZE", path]);
  if (result.code !== 0) return "fincore unavailable";
  const [resident, size] = result.stdout.trim().split(/\s+/).map(Number);
  return `${resident} of ${size} bytes resident (${((100 * (resident ?? 0)) / (size ?? 1)).toFixed(1)}%)`;
}

/** Our server on the full stack; with `snapshot`, a held snapshot whose image is `uri`'s export. */
export async function startOurs(file: string, directory: string, snapshot: boolean): Promise<Server> {
  const socket = join(directory, snapshot ? "blocksnap-snapshot.sock" : "blocksnap.sock");
  fs.rmSync(socket, { force: true });
  const args = [join(here, "bench-server.js"), file, socket, ...(snapshot ? ["--snapshot", directory] : [])];
  const child = spawn(process.execPath, args, { stdio: ["ignore", "pipe", "inherit"] });
  const imageName = await new Promise<string>((resolve, reject) => {
    let output = "";
    child.stdout?.on("data", (chunk: Buffer) => {
      output += chunk.toString("utf8");
      const match = /^ready (\S+)$/m.exec(output);
      if (match?.[1]) resolve(match[1]);
    });
    child.once("exit", (code) => reject(new Error(`bench-server exited with ${code}`)));
  });
  const exportName = snapshot ? imageName : "disk";
  return {
    name: "blocksnap",
    uri: `nbd+unix:///${encodeURIComponent(exportName)}?socket=${socket}`,
    originUri: `nbd+unix:///disk?socket=${socket}`,
    ...(child.pid === undefined ? {} : { pid: child.pid }),
    stop: async () => {
      child.kill("SIGTERM");
      await new Promise((resolve) => child.once("exit", resolve));
    },
  };
}

export async function startDaemonized(
  name: string,
  command: string,
  args: string[],
  socket: string,
  pidFile: string,
) {
  fs.rmSync(socket, { force: true });
  // A pid file left by an earlier run would name a process that may no longer be this server's.
  fs.rmSync(pidFile, { force: true });
  await execOk(command, args);
  await waitForSocket(socket);
  const pid = await waitForPid(pidFile);
  return {
    name,
    uri: `nbd+unix:///?socket=${socket}`,
    pid,
    stop: async () => {
      process.kill(pid, "SIGTERM");
      await poll(250, () => {
        try {
          process.kill(pid, 0);
          return undefined;
        } catch {
          return true;
        }
      });
    },
  } satisfies Server;
}

/** The pid a daemonized server wrote (some write it after they listen). */
async function waitForPid(pidFile: string): Promise<number> {
  const pid = await poll(250, () => {
    const text = fs.existsSync(pidFile) ? fs.readFileSync(pidFile, "utf8") : "";
    return text.endsWith("\n") ? Number(text.trim()) : undefined;
  });
  if (pid === undefined) throw new Error(`no pid in ${pidFile} after 5 s`);
  return pid;
}

export function startNbdkit(file: string, directory: string): Promise<Server> {
  const socket = join(directory, "nbdkit.sock");
  const pidFile = join(directory, "nbdkit.pid");
  return startDaemonized(
    "nbdkit file",
    "nbdkit",
    ["-U", socket, "-P", pidFile, "file", file],
    socket,
    pidFile,
  );
}

export function startQemuNbd(file: string, directory: string): Promise<Server> {
  const socket = join(directory, "qemu.sock");
  const pidFile = join(directory, "qemu.pid");
  const args = ["-f", "raw", "-t", "-e", "0", "-k", socket, `--pid-file=${pidFile}`, "--fork", file];
  return startDaemonized("qemu-nbd", "qemu-nbd", args, socket, pidFile);
}

export interface FioJob {
  readonly rw: string;
  readonly bs: string;
  readonly iodepth: number;
}

export async function fio(
  uri: string,
  job: FioJob,
  options: BenchOptions,
): Promise<{ iops: number; mibPerSecond: number }> {
  const output = join(options.directory, "fio.json");
  await execOk("fio", [
    "--name=bench",
    "--ioengine=nbd",
    `--uri=${uri}`,
    `--rw=${job.rw}`,
    `--bs=${job.bs}`,
    `--iodepth=${job.iodepth}`,
    `--size=${options.sizeMib}M`,
    `--runtime=${options.runtimeSeconds}`,
    "--time_based",
    "--output-format=json",
    `--output=${output}`,
  ]);
  const text = fs.readFileSync(output, "utf8");
  const report = JSON.parse(text.slice(text.indexOf("{"))) as {
    jobs: Array<{ error: number; read: { iops: number; bw: number }; write: { iops: number; bw: number } }>;
  };
  const result = report.jobs[0]!;
  if (result.error !== 0) throw new Error(`fio reported error ${result.error}`);
  const side = job.rw.includes("read") ? result.read : result.write;
  return { iops: side.iops, mibPerSecond: side.bw / 1024 };
}

export function repositoryRoot(): string {
  let directory = here;
  for (let depth = 0; depth < 6; depth += 1) {
    if (fs.existsSync(join(directory, "package.json")) && fs.existsSync(join(directory, "src")))
      return directory;
    directory = dirname(directory);
  }
  return process.cwd();
}

/** CPU time (user + system, every thread) a process has used so far, in ms; null when it cannot be read. */
export function processCpuMs(pid: number): number | null {
  try {
    const ticks = statCpuTicks(`/proc/${pid}/stat`);
    return Number.isFinite(ticks) ? ticks * 10 : null;
  } catch {
    return null;
  }
}

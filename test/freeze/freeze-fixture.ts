/**
 * Set-up for the root tests of freeze-around-take through the real daemon and CLI: `blocksnap serve` in a
 * temp state dir with FUSE at <state>/mnt, devices on sparse files, loop devices over the FUSE files
 * (`losetup --direct-io=on`), file systems made and mounted on them, and bookkeeping of every loop device,
 * mount and snapshot so that cleanup thaws, unmounts, detaches and stops the daemon even when a test
 * fails halfway or the daemon hangs.
 *
 * Every external command runs asynchronously with a bound: a deadlock (a freeze that waits for I/O the
 * daemon never serves) fails the test with a timeout instead of hanging CI. Anything that touches a
 * mounted file system runs in a child process, because a frozen file system blocks its writers.
 */
import assert from "node:assert/strict";
import { execFile } from "node:child_process";
import { existsSync } from "node:fs";
import { mkdir, mkdtemp, readFile, rm } from "node:fs/promises";
import { tmpdir } from "node:os";
import { join } from "node:path";
import type { TestContext } from "node:test";
import type { SnapshotView } from "../../src/daemon/api-types.js";
import { cleanEnvironment, cliPath, DaemonProcess } from "../cli/cli-harness.js";
import { isRoot, which } from "../helpers/commands.js";

export const MiB = 1024 * 1024;
/** Bound for a command that should take well under a second or two. */
export const quickTimeoutMs = 15_000;
/** Bound for a take: far above a healthy take (tens of ms), far below a hung CI job. */
export const takeTimeoutMs = 30_000;
const cleanupTimeoutMs = 10_000;

export interface BoundedResult {
  readonly code: number | null;
  readonly timedOut: boolean;
  readonly stdout: string;
  readonly stderr: string;
}

/** Runs a command with a time bound (SIGKILL when it runs out); never rejects. */
export function runBounded(
  file: string,
  args: readonly string[],
  timeoutMs: number = quickTimeoutMs,
): Promise<BoundedResult> {
  return new Promise((resolve) => {
    execFile(
      file,
      [...args],
      {
        timeout: timeoutMs,
        killSignal: "SIGKILL",
        maxBuffer: 16 << 20,
        encoding: "utf8",
        env: cleanEnvironment({ LC_ALL: "C" }),
      },
      (error, stdout, stderr) => {
        const code = error ? (typeof error.code === "number" ? error.code : null) : 0;
        resolve({ code, timedOut: error?.killed === true, stdout, stderr });
      },
    );
  });
}

/** Runs a command that must succeed within its bound; returns stdout. */
export async function mustRun(
  file: string,
  args: readonly string[],
  timeoutMs: number = quickTimeoutMs,
): Promise<string> {
  const result = await runBounded(file, args, timeoutMs);
  assert.ok(
    result.code === 0,
    `${file} ${args.join(" ")} ${result.timedOut ? `timed out after ${timeoutMs} ms` : `exited ${result.code}`}: ${result.stderr}${result.stdout}`,
  );
  return result.stdout;
}

/** `sh -c SCRIPT sh ARGS...`, bounded. */
export function shell(script: string, args: readonly string[], timeoutMs?: number): Promise<BoundedResult> {
  return runBounded("sh", ["-c", script, "sh", ...args], timeoutMs);
}

export async function mustShell(
  script: string,
  args: readonly string[],
  timeoutMs?: number,
): Promise<string> {
  return mustRun("sh", ["-c", script, "sh", ...args], timeoutMs);
}

/**
 * Writes `count` files of random data (sizes not multiples of the block size) into `directory/prefix*`
 * and prints their checksums — without any sync: the data sits in the page cache, dirty, when this
 * returns. The checksums are read back from the page cache.
 */
export function writeUnsyncedFiles(directory: string, prefix: string, count: number): Promise<string> {
  const script = [
    "set -e",
    'cd "$1"',
    `i=1; while [ $i -le ${count} ]; do head -c $((i * 700001 + 13)) /dev/urandom > "$2$i"; i=$((i + 1)); done`,
    'sha256sum "$2"*',
  ].join("\n");
  return mustShell(script, [directory, prefix]);
}

export async function checksums(directory: string, prefix: string): Promise<string> {
  return mustShell('cd "$1" && sha256sum "$2"*', [directory, prefix]);
}

/** Writes a file and syncs it: returns only if the file system accepts writes (is not frozen). */
export async function mustWriteAndSync(directory: string): Promise<void> {
  await mustShell('echo written > "$1/after-take" && sync -f "$1/after-take"', [directory]);
}

/** FIFREEZE then FITHAW from outside: both succeed only on a file system that is not frozen. */
export async function mustFreezeAndThaw(mountPoint: string): Promise<void> {
  await mustRun("fsfreeze", ["--freeze", mountPoint]);
  await mustRun("fsfreeze", ["--unfreeze", mountPoint]);
}

/** Why these tests cannot run here, or null when they can. */
export function skipReason(tools: readonly string[]): string | null {
  if (!isRoot) return "needs root (FUSE mount, loop devices, mount, fsfreeze)";
  if (!existsSync("/dev/fuse")) return "/dev/fuse is absent";
  for (const tool of ["losetup", "mount", "umount", "fsfreeze", "sha256sum", ...tools]) {
    if (!which(tool)) return `${tool} is not installed`;
  }
  return null;
}

export interface FileSystemOnDevice {
  readonly device: string;
  readonly loopDevice: string;
  readonly mountPoint: string;
  readonly fsType: "ext4" | "xfs";
}

export class FreezeDaemonFixture {
  readonly directory: string;
  readonly stateDir: string;
  readonly mountDir: string;
  readonly daemon: DaemonProcess;
  private readonly loops: string[] = [];
  private readonly mounts: string[] = [];
  private readonly snapshots = new Set<string>();
  private keptLoops = 0;
  private keptMounts = 0;

  private constructor(directory: string, daemon: DaemonProcess) {
    this.directory = directory;
    this.stateDir = daemon.stateDir;
    this.mountDir = join(daemon.stateDir, "mnt");
    this.daemon = daemon;
  }

  static async start(label: string): Promise<FreezeDaemonFixture> {
    const directory = await mkdtemp(join(tmpdir(), `blocksnap-${label}-`));
    try {
      const daemon = await DaemonProcess.start(join(directory, "state"), { args: ["--nbd-listen", "none"] });
      return new FreezeDaemonFixture(directory, daemon);
    } catch (error) {
      await rm(directory, { recursive: true, force: true });
      throw error;
    }
  }

  /** The CLI against this daemon, bounded. */
  cli(args: readonly string[], timeoutMs: number = quickTimeoutMs): Promise<BoundedResult> {
    return runBounded(process.execPath, [cliPath, ...args, "--state-dir", this.stateDir], timeoutMs);
  }

  async cliOk(args: readonly string[], timeoutMs?: number): Promise<string> {
    const result = await this.cli(args, timeoutMs);
    assert.ok(
      result.code === 0,
      `blocksnap ${args.join(" ")} ${result.timedOut ? "timed out" : `exited ${result.code}`}: ${result.stderr}`,
    );
    return result.stdout;
  }

  async cliJson<T>(args: readonly string[], timeoutMs?: number): Promise<T> {
    return JSON.parse(await this.cliOk([...args, "--json"], timeoutMs)) as T;
  }

  /** A device on a sparse file, a loop device over its FUSE file, a fresh file system mounted on it. */
  async fileSystem(device: string, fsType: "ext4" | "xfs", sizeBytes: number): Promise<FileSystemOnDevice> {
    await this.cliOk([
      "device",
      "add",
      device,
      "--backend",
      join(this.directory, `${device}.img`),
      "--size",
      `${sizeBytes}`,
    ]);
    const loopDevice = await this.attachLoop(device);
    const mkfs =
      fsType === "ext4" ? ["mkfs.ext4", "-q", "-F", loopDevice] : ["mkfs.xfs", "-q", "-f", loopDevice];
    await mustRun(mkfs[0]!, mkfs.slice(1), 60_000);
    const mountPoint = await this.mount(loopDevice, `fs-${device}`);
    return { device, loopDevice, mountPoint, fsType };
  }

  async attachLoop(fileName: string, readOnly = false): Promise<string> {
    const path = join(this.mountDir, fileName);
    const args = ["--direct-io=on", ...(readOnly ? ["-r"] : []), "-f", "--show", path];
    const loopDevice = (await mustRun("losetup", args)).trim();
    this.loops.push(loopDevice);
    return loopDevice;
  }

  async detachLoop(loopDevice: string): Promise<void> {
    await mustRun("losetup", ["-d", loopDevice]);
    this.loops.splice(this.loops.indexOf(loopDevice), 1);
  }

  async mount(loopDevice: string, label: string, options: readonly string[] = []): Promise<string> {
    const target = join(this.directory, label);
    await mkdir(target, { recursive: true });
    await mustRun("mount", [...options, loopDevice, target]);
    this.mounts.push(target);
    return target;
  }

  async unmount(target: string): Promise<void> {
    await mustRun("umount", [target]);
    this.mounts.splice(this.mounts.indexOf(target), 1);
  }

  /** `snapshot create`, remembered so that cleanup destroys it. */
  async createSnapshot(args: readonly string[]): Promise<string> {
    const id = (await this.cliOk(["snapshot", "create", ...args])).trim();
    this.snapshots.add(id);
    return id;
  }

  async destroySnapshot(id: string): Promise<void> {
    await this.cliOk(["snapshot", "destroy", id]);
    this.snapshots.delete(id);
  }

  async snapshotInfo(id: string): Promise<SnapshotView> {
    return this.cliJson<SnapshotView>(["snapshot", "info", id]);
  }

  /** From now on, rollback() keeps the loops and mounts that exist (the file systems of before()). */
  keepCurrent(): void {
    this.keptLoops = this.loops.length;
    this.keptMounts = this.mounts.length;
  }

  /**
   * After each test, also a failed one: unmounts and detaches what the test attached, destroys its
   * snapshots (freeing the devices for the next test) and makes sure no kept mount stays frozen.
   */
  async rollback(): Promise<void> {
    for (const target of this.mounts) await runBounded("fsfreeze", ["--unfreeze", target], cleanupTimeoutMs);
    for (const target of this.mounts.splice(this.keptMounts).reverse())
      await runBounded("umount", ["-l", target], cleanupTimeoutMs);
    for (const loop of this.loops.splice(this.keptLoops).reverse())
      await runBounded("losetup", ["-d", loop], cleanupTimeoutMs);
    for (const id of this.snapshots) await this.cli(["snapshot", "destroy", id]);
    this.snapshots.clear();
  }

  /**
   * Undoes everything, each step bounded and independent of the others: thaw every mount (a take that
   * hung may have left one frozen), unmount lazily, detach loops, destroy snapshots, stop the daemon
   * (SIGKILL if it does not stop), unmount a FUSE mount it left, then remove the temp dir — only when
   * nothing is mounted under it any more.
   */
  async cleanup(): Promise<void> {
    for (const target of this.mounts) await runBounded("fsfreeze", ["--unfreeze", target], cleanupTimeoutMs);
    for (const target of this.mounts.reverse()) await runBounded("umount", ["-l", target], cleanupTimeoutMs);
    this.mounts.length = 0;
    for (const loop of this.loops.reverse()) await runBounded("losetup", ["-d", loop], cleanupTimeoutMs);
    this.loops.length = 0;
    for (const id of this.snapshots) await this.cli(["snapshot", "destroy", id]);
    this.snapshots.clear();
    const stopped = await Promise.race([
      this.daemon.stop("SIGTERM"),
      new Promise<null>((resolve) => setTimeout(resolve, cleanupTimeoutMs, null).unref()),
    ]);
    if (stopped === null) await this.daemon.stop("SIGKILL");
    if (await this.hasMountsUnder()) await runBounded("umount", ["-l", this.mountDir], cleanupTimeoutMs);
    if (await this.hasMountsUnder()) return;
    await rm(this.directory, { recursive: true, force: true });
  }

  private async hasMountsUnder(): Promise<boolean> {
    const mounts = await readFile("/proc/self/mounts", "utf8");
    return mounts.split("\n").some((line) => line.split(" ")[1]?.startsWith(`${this.directory}/`));
  }
}

/** Shared shape of the report checks: the mounts frozen at take, without the timings. */
export function frozenMounts(
  view: SnapshotView,
): { device: string; mountPoint: string; error: string | null }[] {
  return (view.takeReport?.frozen ?? [])
    .map((mount) => ({ device: mount.device, mountPoint: mount.mountPoint, error: mount.error }))
    .sort((a, b) => a.device.localeCompare(b.device));
}

export function skipUnless(t: TestContext, reason: string | null): boolean {
  if (reason === null) return true;
  t.skip(reason);
  return false;
}

/**
 * Mount-table chores for the FUSE face, all through mount(8)/umount(8) and /proc/self/mountinfo, without
 * libfuse or fusermount: mount an open /dev/fuse descriptor, unmount (lazily when busy), abort a
 * connection through fusectl, and find and remove a stale mount left by a crashed daemon.
 *
 * Every external command runs asynchronously: the FUSE server lives on this process's event loop, and a
 * synchronous child (spawnSync) that touches the mount would wait for a reply that can never be sent.
 * mount and umount run with -i so that no mount.fuse / umount.fuse helper interprets our options.
 */
import { execFile, spawn } from "node:child_process";
import { realpath, writeFile } from "node:fs/promises";
import { basename, dirname, join, resolve } from "node:path";
import { BlockError } from "../block/errors.js";
import type { Logger } from "../util/logger.js";
import { silentLogger } from "../util/logger.js";
import { type MountInfoEntry, readMountInfo } from "../util/mount-info.js";

export const fuseFsType = "fuse.blocksnap";
const fuseSource = "blocksnap";
const fusectlDir = "/sys/fs/fuse/connections";
const commandTimeoutMs = 30_000;
const probeTimeoutMs = 5_000;

export interface CommandResult {
  readonly exitCode: number | null;
  readonly stdout: string;
  readonly stderr: string;
}

/** Runs a command without a shell; never rejects for a non-zero exit, only reports it. */
export function runCommand(
  file: string,
  args: readonly string[],
  timeoutMs = commandTimeoutMs,
): Promise<CommandResult> {
  return new Promise((resolvePromise) => {
    execFile(
      file,
      [...args],
      { timeout: timeoutMs, env: { ...process.env, LC_ALL: "C" }, maxBuffer: 1 << 20 },
      (error, stdout, stderr) => {
        const code = (error as { code?: unknown } | null)?.code;
        const exitCode = error ? (typeof code === "number" ? code : null) : 0;
        const detail = error && exitCode === null ? `${stderr}${String(error)}` : stderr;
        resolvePromise({ exitCode, stdout, stderr: detail });
      },
    );
  });
}

/** blocksnap FUSE mounts at `mountPoint`, bottom first (later lines are mounted on top). */
export async function blocksnapMountsAt(mountPoint: string): Promise<MountInfoEntry[]> {
  return (await readMountInfo()).filter(
    (entry) => entry.mountPoint === mountPoint && entry.fsType === fuseFsType,
  );
}

/**
 * The canonical path of a mount directory as mountinfo shows it. Only the parent is resolved: the
 * directory itself may be a dead FUSE mount on which every stat fails with ENOTCONN.
 */
export async function canonicalMountDir(mountDir: string): Promise<string> {
  const absolute = resolve(mountDir);
  try {
    return join(await realpath(dirname(absolute)), basename(absolute));
  } catch {
    return absolute;
  }
}

/** Mounts the open /dev/fuse `fd` at `mountDir` (canonical). The kernel queues INIT before this returns. */
export function mountFuse(fd: number, mountDir: string): Promise<void> {
  const uid = process.getuid?.() ?? 0;
  const gid = process.getgid?.() ?? 0;
  const options = `fd=3,rootmode=40000,user_id=${uid},group_id=${gid},allow_other,default_permissions`;
  return new Promise((resolvePromise, reject) => {
    const child = spawn("mount", ["-i", "-t", fuseFsType, "-o", options, fuseSource, mountDir], {
      stdio: ["ignore", "pipe", "pipe", fd],
      env: { ...process.env, LC_ALL: "C" },
    });
    let output = "";
    child.stdout?.on("data", (chunk: Buffer) => {
      output += chunk.toString();
    });
    child.stderr?.on("data", (chunk: Buffer) => {
      output += chunk.toString();
    });
    const timer = setTimeout(() => child.kill("SIGKILL"), commandTimeoutMs);
    child.on("error", (error) => {
      clearTimeout(timer);
      reject(new BlockError("ENOENT", `Cannot run mount: ${error.message}`, { cause: error }));
    });
    child.on("close", (code, signal) => {
      clearTimeout(timer);
      if (code === 0) resolvePromise();
      else {
        const how = signal ? `killed by ${signal}` : `exit status ${code}`;
        reject(
          new BlockError("EIO", `mount -t ${fuseFsType} at ${mountDir} failed (${how}): ${output.trim()}`),
        );
      }
    });
  });
}

export type UnmountResult = "unmounted" | "lazy" | "gone";

/**
 * Unmounts the blocksnap mount with `deviceNumber` at `mountDir`: a plain umount first, a lazy one when
 * the file system is busy (open files, loop devices). "gone" when it was not mounted any more.
 */
export async function unmountFuse(
  mountDir: string,
  deviceNumber: number,
  logger: Logger,
): Promise<UnmountResult> {
  const ours = async () =>
    (await blocksnapMountsAt(mountDir)).some((entry) => entry.deviceNumber === deviceNumber);
  if (!(await ours())) return "gone";
  const plain = await runCommand("umount", ["-i", mountDir]);
  if (plain.exitCode === 0) return "unmounted";
  logger.info({ mountDir, detail: plain.stderr.trim() }, "fuse mount busy, unmounting lazily");
  const lazy = await runCommand("umount", ["-i", "-l", mountDir]);
  if (lazy.exitCode === 0) return "lazy";
  if (!(await ours())) return "gone";
  throw new BlockError("EBUSY", `Cannot unmount ${mountDir}: ${lazy.stderr.trim() || plain.stderr.trim()}`);
}

/**
 * Aborts a FUSE connection (fusectl's `abort`): every pending and future request fails at once with
 * ENOTCONN, and our reader's read(2) returns ENODEV. Mounts fusectl first if nobody has.
 */
export async function abortConnection(deviceNumber: number, logger: Logger): Promise<void> {
  const mounted = (await readMountInfo()).some(
    (entry) => entry.fsType === "fusectl" && entry.mountPoint === fusectlDir,
  );
  if (!mounted) {
    const result = await runCommand("mount", ["-t", "fusectl", "fusectl", fusectlDir]);
    if (result.exitCode !== 0) logger.warn({ detail: result.stderr.trim() }, "cannot mount fusectl");
  }
  try {
    await writeFile(join(fusectlDir, String(deviceNumber), "abort"), "1");
  } catch (error) {
    // The connection may have ended by itself meanwhile; the caller checks whether its reader ended.
    logger.warn({ err: error, deviceNumber }, "cannot abort the fuse connection");
  }
}

/**
 * Removes a leftover blocksnap mount at `mountDir` whose server is gone: a crashed daemon leaves one
 * behind, and every access to it fails with "Transport endpoint is not connected" (ENOTCONN). A mount
 * that still answers belongs to a live server and is left alone. Returns true when one was removed.
 */
export async function removeStaleMount(mountDir: string, logger: Logger = silentLogger): Promise<boolean> {
  const dir = await canonicalMountDir(mountDir);
  let removed = false;
  // Crashed daemons may have stacked several mounts here; each round removes the topmost.
  for (let round = 0; round < 16; round += 1) {
    if ((await blocksnapMountsAt(dir)).length === 0) break;
    if (!(await isDisconnected(dir))) break;
    const result = await runCommand("umount", ["-i", "-l", dir]);
    if (result.exitCode !== 0) {
      throw new BlockError("EBUSY", `Cannot remove the stale mount at ${dir}: ${result.stderr.trim()}`);
    }
    logger.info({ mountDir: dir }, "removed a stale blocksnap fuse mount");
    removed = true;
  }
  return removed;
}

/** Whether the file system at `dir` fails with ENOTCONN. Probed in a child: a hung server cannot hang us. */
async function isDisconnected(dir: string): Promise<boolean> {
  const result = await runCommand("stat", ["-c", "%i", "--", dir], probeTimeoutMs);
  return result.exitCode !== 0 && result.stderr.includes("Transport endpoint is not connected");
}

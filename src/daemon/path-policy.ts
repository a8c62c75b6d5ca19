/**
 * The daemon's rules for where a device backend or a snapshot storage may be (the engine's PathPolicy; the
 * engine itself refuses anything that shares bytes with another backend or storage, backend-claims.ts).
 * Refused, with why:
 * - relative paths: the daemon's working directory is not the client's (the CLI makes paths absolute);
 * - /proc and /sys, and any file on a pseudo file system (procfs, sysfs, debugfs…): /proc/self/mem as a
 *   "disk" would export the daemon's memory, and none of them holds data;
 * - anything inside the state directory, or that is one of its files reached another way (hard link,
 *   loop device): storage writes would grow devices.json until the next start fails;
 * - anything on the daemon's own FUSE mount (by path, and by the file system's device number, which also
 *   catches bind mounts and loop devices over our files): its I/O would wait for the event loop that is
 *   doing it, a deadlock that even SIGKILL leaves in D state.
 *
 * checkPath runs before anything is opened and only on the path's parent directory; every stat goes
 * through the libuv pool (promises), never synchronously, because a stat on our own FUSE mount is
 * answered by this very event loop. checkFile runs again on the opened descriptor's identity and kernel
 * name, so a path swapped after checkPath is still caught.
 */
import { realpath, stat } from "node:fs/promises";
import { basename, dirname, isAbsolute, join, resolve } from "node:path";
import { BlockError } from "../block/errors.js";
import type { OpenedFile, PathPolicy, PathRole } from "../engine/backend-claims.js";
import { fuseFsType } from "../fuse/fuse-mount.js";
import { collide, identityOf, majorMinorOf, statOrNull } from "../util/file-identity.js";
import { type MountInfoEntry, readMountInfo } from "../util/mount-info.js";
import { deviceRegistryPathIn, lockFilePathIn } from "./paths.js";

/** File systems that hold no data: never a backend or a storage. */
const pseudoFsTypes: ReadonlySet<string> = new Set([
  "proc",
  "sysfs",
  "debugfs",
  "tracefs",
  "securityfs",
  "configfs",
  "cgroup",
  "cgroup2",
  "devpts",
  "bpf",
  "fusectl",
  "pstore",
  "efivarfs",
  "binfmt_misc",
  "mqueue",
  "nsfs",
  "selinuxfs",
  "autofs",
]);
const pseudoRoots = ["/proc", "/sys"];

export interface DaemonPathPolicyOptions {
  readonly stateDir: string;
  /** The FUSE mount directory while mounted, else null. */
  readonly fuseMountDir: () => string | null;
}

export class DaemonPathPolicy implements PathPolicy {
  private readonly stateDir: string;
  private readonly fuseMountDir: () => string | null;

  constructor(options: DaemonPathPolicyOptions) {
    this.stateDir = options.stateDir;
    this.fuseMountDir = options.fuseMountDir;
  }

  async checkPath(path: string, role: PathRole): Promise<void> {
    const refuse = (why: string) => refusal(path, role, why);
    if (path.includes("\0")) throw refuse("it contains a NUL byte");
    if (!isAbsolute(path)) {
      throw refuse("it is a relative path (give an absolute one; the CLI resolves relative paths for you)");
    }
    const canonical = await canonicalPath(path);
    for (const root of pseudoRoots) {
      if (isInside(canonical, root)) throw refuse(`it is under ${root}, which holds no data`);
    }
    const stateDir = await canonicalPath(resolve(this.stateDir));
    if (isInside(canonical, stateDir)) throw refuse(`it is inside the daemon's state directory ${stateDir}`);
    const mountDir = this.fuseMountDir();
    if (mountDir !== null && isInside(canonical, mountDir)) {
      throw refuse(`it is on this daemon's own FUSE mount ${mountDir} (its I/O would deadlock)`);
    }
    // The file system of the path (a directory may be a mount point, also a bind mount of ours), else of
    // its parent, tells what it is on before anything is opened there. The stats run on the libuv pool.
    const target =
      (await stat(canonical, { bigint: true }).catch(() => null)) ??
      (await stat(dirname(canonical), { bigint: true }).catch(() => null));
    if (target !== null) await this.checkFileSystem(majorMinorOf(target.dev), refuse);
  }

  async checkFile(file: OpenedFile): Promise<void> {
    const refuse = (why: string) => refusal(file.path, file.role, why);
    const fileSystems = new Set<string>();
    if (file.identity.kind === "file") fileSystems.add(majorMinorOf(file.stats.dev));
    for (const extent of file.identity.extents) {
      if (extent.fileSystem !== null) fileSystems.add(extent.fileSystem);
    }
    for (const fileSystem of fileSystems) await this.checkFileSystem(fileSystem, refuse);
    if (file.kernelPath !== null && isAbsolute(file.kernelPath)) {
      const stateDir = await canonicalPath(resolve(this.stateDir));
      if (isInside(file.kernelPath, stateDir))
        throw refuse(`it is inside the daemon's state directory ${stateDir}`);
      for (const root of pseudoRoots) {
        if (isInside(file.kernelPath, root)) throw refuse(`it is under ${root}, which holds no data`);
      }
    }
    for (const statePath of [deviceRegistryPathIn(this.stateDir), lockFilePathIn(this.stateDir)]) {
      const stats = await statOrNull(statePath).catch(() => null);
      const identity = stats === null ? null : await identityOf(stats);
      if (identity !== null && collide(identity, file.identity)) {
        throw refuse(`it is the daemon's state file ${statePath}, reached another way`);
      }
    }
  }

  /** Refuses pseudo file systems and our own FUSE mount, by the device number of the file system. */
  private async checkFileSystem(majorMinor: string, refuse: (why: string) => BlockError): Promise<void> {
    const mounts = await readMountInfo();
    const mount = mounts.find((entry) => entry.majorMinor === majorMinor);
    if (mount === undefined) return;
    if (pseudoFsTypes.has(mount.fsType)) {
      throw refuse(
        `it is on a ${mount.fsType} pseudo file system (${mount.mountPoint}), which holds no data`,
      );
    }
    if (isOurFuseMount(mount, mounts, this.fuseMountDir())) {
      throw refuse(`it is on this daemon's own FUSE mount (its I/O would deadlock)`);
    }
  }
}

function isOurFuseMount(mount: MountInfoEntry, mounts: MountInfoEntry[], mountDir: string | null): boolean {
  if (mount.fsType !== fuseFsType || mountDir === null) return false;
  return mounts.some(
    (entry) =>
      entry.fsType === fuseFsType && entry.mountPoint === mountDir && entry.majorMinor === mount.majorMinor,
  );
}

/** realpath, or for a path that does not exist yet, the realpath of its parent joined with its name. */
async function canonicalPath(path: string): Promise<string> {
  const absolute = resolve(path);
  try {
    return await realpath(absolute);
  } catch {
    try {
      return join(await realpath(dirname(absolute)), basename(absolute));
    } catch {
      return absolute;
    }
  }
}

function isInside(path: string, directory: string): boolean {
  if (directory === "/") return true;
  return path === directory || path.startsWith(`${directory}/`);
}

function refusal(path: string, role: PathRole, why: string): BlockError {
  const what = role === "backend" ? "a device backend" : "difference storage";
  return new BlockError("EINVAL", `Cannot use ${JSON.stringify(path)} as ${what}: ${why}`);
}

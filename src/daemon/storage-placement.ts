/**
 * Whether a difference storage would live on one of its own snapshot's devices: a file system mounted on a
 * loop device (or a partition of one) whose backing file is a member's FUSE file. Such a storage hangs the
 * take: the freeze blocks the copy-before-write writes into the frozen file system, and the daemon waits
 * on itself (issue 17). The path's file system is found by its st_dev (for a path that does not exist yet,
 * its parent's), the mount by mountinfo, the loop device by its major:minor in sysfs.
 *
 * Asynchronous on purpose: a stat under such a mount is answered by this very daemon's FUSE face. Not done:
 * device-mapper or md stacks over a loop device, and a member served over NBD (nbd-client) and mounted.
 */
import { readFile, realpath, stat } from "node:fs/promises";
import { dirname, join } from "node:path";
import { listLoopDevices, majorMinorOf } from "../util/file-identity.js";
import { readMountInfo } from "../util/mount-info.js";

export interface StorageOnDevice {
  /** The member device whose FUSE file holds the storage's file system. */
  readonly device: string;
  readonly loopDevice: string;
  readonly mountPoint: string;
  readonly fsType: string;
}

/**
 * The member device (name → its FUSE file) that holds the file system `storagePath` is on, or null.
 * `memory:` and block devices (which path-policy.ts already checks by identity) are never on one here.
 */
export async function storageOnDevices(
  storagePath: string,
  deviceFiles: ReadonlyMap<string, string>,
): Promise<StorageOnDevice | null> {
  if (deviceFiles.size === 0 || !storagePath.startsWith("/")) return null;
  const stats =
    (await stat(storagePath, { bigint: true }).catch(() => null)) ??
    (await stat(dirname(storagePath), { bigint: true }).catch(() => null));
  if (stats === null || stats.isBlockDevice()) return null;
  const fileSystem = majorMinorOf(stats.dev);
  const diskOf = await wholeDiskOf(fileSystem);
  const loop = (await listLoopDevices()).find((entry) => entry.majorMinor === diskOf);
  if (loop === undefined) return null;
  const device = [...deviceFiles].find(([, file]) => file === loop.backingFile)?.[0];
  if (device === undefined) return null;
  const mount = (await readMountInfo()).find((entry) => entry.majorMinor === fileSystem);
  return {
    device,
    loopDevice: loop.path,
    mountPoint: mount?.mountPoint ?? dirname(storagePath),
    fsType: mount?.fsType ?? "unknown",
  };
}

/** The major:minor of the disk a partition belongs to (e.g. loop3p1 → loop3), else the device itself. */
async function wholeDiskOf(majorMinor: string): Promise<string> {
  const sysDir = `/sys/dev/block/${majorMinor}`;
  const isPartition = await stat(join(sysDir, "partition")).then(
    () => true,
    () => false,
  );
  if (!isPartition) return majorMinor;
  const parent = await realpath(sysDir)
    .then((dir) => readFile(join(dir, "..", "dev"), "utf8"))
    .catch(() => null);
  return parent?.trim() ?? majorMinor;
}

/**
 * What a file or block device *is*, never what it is called: the daemon must see that a hard link, a `..`
 * path, a symlink, a loop device or a partition all reach bytes it already uses. An identity is a list of
 * extents over base objects: a regular file is all of (st_dev, st_ino); a block device is resolved through
 * sysfs down to what holds its bytes: a partition to a byte range of its disk, a loop device to a byte range
 * of its backing file (/sys/dev/block/M:m/loop/{backing_file,offset,sizelimit}; sysfs has no inode, so the
 * backing file is stat'ed by that path; a deleted backing file is only known by the kernel's "path
 * (deleted)" text, which the kernel also shows for our own descriptors of that file), any other block device
 * to all of itself. Two identities collide when an extent of one overlaps an extent of the other.
 *
 * Everything here is asynchronous: a stat may reach blocksnap's own FUSE mount, which this process serves
 * on its event loop, so a synchronous stat there would wait forever for its own answer.
 *
 * Not done: device-mapper and md devices are not resolved to their components (the kernel's holders and
 * O_EXCL keep those from being opened twice), nor are files inside a file system on a device.
 */
import type { BigIntStats } from "node:fs";
import { fstat as fstatCallback } from "node:fs";
import { readdir, readFile, readlink, realpath, stat } from "node:fs/promises";
import { join } from "node:path";
import { promisify } from "node:util";
import { readMountInfo } from "./mount-info.js";

const sectorSizeBytes = 512;
/** Partitions of loop devices of partitions…: bounded, a cycle would be a kernel bug. */
const resolveDepthMax = 8;
const deletedSuffix = " (deleted)";

/** Bytes [startBytes, endBytes) of one base object (a file or a whole disk); endBytes may be Infinity. */
export interface Extent {
  /** `file:<maj:min>:<inode>`, `block:<maj:min>`, or `deleted:<kernel path>` for an unlinked file. */
  readonly key: string;
  /** For a file, the maj:min of its file system (to tell which mount it is on); else null. */
  readonly fileSystem: string | null;
  readonly startBytes: number;
  readonly endBytes: number;
}

export interface FileIdentity {
  readonly kind: "file" | "block-device";
  /** Regular file: `file:<maj:min>:<inode>`; block device: `block:<maj:min>` of the device itself. */
  readonly self: string;
  /** maj:min of the block device (st_rdev); null for a regular file. */
  readonly deviceNumber: string | null;
  readonly extents: readonly Extent[];
}

/** The glibc encoding of dev_t, as Node's stat returns it. */
export function majorMinorOf(dev: bigint): string {
  const major = ((dev >> 8n) & 0xfffn) | ((dev >> 32n) & ~0xfffn);
  const minor = (dev & 0xffn) | ((dev >> 12n) & ~0xffn);
  return `${major}:${minor}`;
}

export function fileKey(stats: BigIntStats): string {
  return `file:${majorMinorOf(stats.dev)}:${stats.ino}`;
}

const fstatBigInt = promisify((fd: number, callback: (error: Error | null, stats: BigIntStats) => void) =>
  fstatCallback(fd, { bigint: true }, callback),
);

/** fstat of an open descriptor, on the libuv pool (see the notes above). */
export function fstatDescriptor(fd: number): Promise<BigIntStats> {
  return fstatBigInt(fd);
}

/** stat(2) that follows symlinks; null when nothing is there. */
export async function statOrNull(path: string): Promise<BigIntStats | null> {
  try {
    return await stat(path, { bigint: true });
  } catch (error) {
    if ((error as NodeJS.ErrnoException).code === "ENOENT") return null;
    throw error;
  }
}

/** The kernel's name for what `fd` has open (readlink of /proc/self/fd/N), e.g. "/tmp/#123 (deleted)". */
export async function kernelPathOf(fd: number): Promise<string | null> {
  try {
    return await readlink(`/proc/self/fd/${fd}`);
  } catch {
    return null;
  }
}

/**
 * The identity of a regular file or block device from its stat (`kernelPath`: the descriptor's kernel
 * name, which gives an unlinked file the alias a loop device over it would show). Other types: null.
 */
export async function identityOf(
  stats: BigIntStats,
  kernelPath: string | null = null,
): Promise<FileIdentity | null> {
  if (stats.isFile()) {
    const key = fileKey(stats);
    const fileSystem = majorMinorOf(stats.dev);
    const extents: Extent[] = [{ key, fileSystem, startBytes: 0, endBytes: Number.POSITIVE_INFINITY }];
    if (kernelPath?.endsWith(deletedSuffix)) {
      extents.push({
        key: `deleted:${kernelPath}`,
        fileSystem,
        startBytes: 0,
        endBytes: Number.POSITIVE_INFINITY,
      });
    }
    return { kind: "file", self: key, deviceNumber: null, extents };
  }
  if (stats.isBlockDevice()) {
    const deviceNumber = majorMinorOf(stats.rdev);
    const extents = await blockExtents(deviceNumber, 0, Number.POSITIVE_INFINITY, 0);
    return { kind: "block-device", self: `block:${deviceNumber}`, deviceNumber, extents };
  }
  return null;
}

/** Whether two identities share any byte. */
export function collide(a: FileIdentity, b: FileIdentity): boolean {
  if (a.self === b.self) return true;
  return a.extents.some((x) =>
    b.extents.some((y) => x.key === y.key && x.startBytes < y.endBytes && y.startBytes < x.endBytes),
  );
}

/** Whether two identities are the same object (the check that a path was not swapped while opened). */
export function sameObject(a: FileIdentity, b: FileIdentity): boolean {
  return a.self === b.self;
}

async function blockExtents(
  majorMinor: string,
  startBytes: number,
  endBytes: number,
  depth: number,
): Promise<Extent[]> {
  const whole: Extent[] = [{ key: `block:${majorMinor}`, fileSystem: null, startBytes, endBytes }];
  if (depth >= resolveDepthMax) return whole;
  const sysDir = `/sys/dev/block/${majorMinor}`;
  const partitionStart = await readSysNumber(join(sysDir, "start"));
  if ((await readSysText(join(sysDir, "partition"))) !== null && partitionStart !== null) {
    const parentDev = await readSysText(join(await realpath(sysDir).catch(() => sysDir), "..", "dev"));
    const sizeBytes = ((await readSysNumber(join(sysDir, "size"))) ?? 0) * sectorSizeBytes;
    if (parentDev !== null) {
      const offsetBytes = partitionStart * sectorSizeBytes;
      return blockExtents(
        parentDev,
        offsetBytes + startBytes,
        offsetBytes + Math.min(endBytes, sizeBytes),
        depth + 1,
      );
    }
  }
  const backingFile = await readSysText(join(sysDir, "loop", "backing_file"));
  if (backingFile !== null && backingFile !== "") {
    const offsetBytes = (await readSysNumber(join(sysDir, "loop", "offset"))) ?? 0;
    const limitBytes = (await readSysNumber(join(sysDir, "loop", "sizelimit"))) ?? 0;
    const end = Math.min(
      offsetBytes + endBytes,
      limitBytes > 0 ? offsetBytes + limitBytes : Number.POSITIVE_INFINITY,
    );
    const start = offsetBytes + startBytes;
    if (backingFile.endsWith(deletedSuffix)) {
      return [
        ...whole,
        { key: `deleted:${backingFile}`, fileSystem: null, startBytes: start, endBytes: end },
      ];
    }
    const backing = await statOrNull(backingFile).catch(() => null);
    if (backing?.isFile()) {
      const fileSystem = majorMinorOf(backing.dev);
      return [...whole, { key: fileKey(backing), fileSystem, startBytes: start, endBytes: end }];
    }
    if (backing?.isBlockDevice()) {
      return [...whole, ...(await blockExtents(majorMinorOf(backing.rdev), start, end, depth + 1))];
    }
  }
  return whole;
}

/**
 * Who else uses a block device: the mount points of it and of its partitions (mountinfo), and the
 * kernel's holders (device-mapper, md, bcache: /sys/dev/block/M:m/holders and those of its partitions).
 * Empty when nobody does.
 */
export async function blockDeviceUsers(majorMinor: string): Promise<string[]> {
  const sysDir = await realpath(`/sys/dev/block/${majorMinor}`).catch(() => null);
  if (sysDir === null) return [];
  const numbers = new Map<string, string>([[majorMinor, sysDir]]);
  for (const entry of await readdir(sysDir).catch(() => [] as string[])) {
    const dev = await readSysText(join(sysDir, entry, "partition")).then((partition) =>
      partition === null ? null : readSysText(join(sysDir, entry, "dev")),
    );
    if (dev !== null) numbers.set(dev, join(sysDir, entry));
  }
  const users: string[] = [];
  const mounts = await readMountInfo();
  for (const [number, dir] of numbers) {
    for (const mount of mounts) {
      if (mount.majorMinor === number) users.push(`mounted at ${mount.mountPoint} (${mount.fsType})`);
    }
    for (const holder of await readdir(join(dir, "holders")).catch(() => [] as string[])) {
      users.push(`held by ${holder}`);
    }
  }
  return [...new Set(users)];
}

export interface LoopDevice {
  /** e.g. "/dev/loop3" */
  readonly path: string;
  readonly majorMinor: string;
  /** The kernel's path of the backing file, as in /sys/block/loopN/loop/backing_file. */
  readonly backingFile: string;
  /** Detached at its last close (mount's loop devices, and one `losetup -d` left open by someone). */
  readonly autoclear: boolean;
}

/** The bound loop devices (read from sysfs). */
export async function listLoopDevices(sysBlock = "/sys/block"): Promise<LoopDevice[]> {
  const names = (await readdir(sysBlock).catch(() => [] as string[])).filter((name) =>
    name.startsWith("loop"),
  );
  const found: LoopDevice[] = [];
  for (const name of names) {
    const backingFile = await readSysText(join(sysBlock, name, "loop", "backing_file"));
    const majorMinor = await readSysText(join(sysBlock, name, "dev"));
    const autoclear = (await readSysText(join(sysBlock, name, "loop", "autoclear"))) === "1";
    if (backingFile && majorMinor) found.push({ path: `/dev/${name}`, majorMinor, backingFile, autoclear });
  }
  return found;
}

/**
 * What uses the loop devices over `file` (by the kernel's path of their backing file): their mounts and
 * holders, each prefixed with the loop device. A loop device that is only attached is listed as
 * "<loop> attached" with `attached: true` (it still holds the file open), else not at all; one that was
 * already detached (`losetup -d` sets autoclear while someone such as udev's probe still has it open, and
 * the kernel lets go at the last close) is not.
 */
export async function loopDeviceUsersOver(
  file: string,
  options: { readonly attached?: boolean } = {},
): Promise<string[]> {
  const users: string[] = [];
  for (const loop of await listLoopDevices()) {
    if (loop.backingFile !== file) continue;
    const loopUsers = await blockDeviceUsers(loop.majorMinor);
    for (const user of loopUsers) users.push(`${loop.path} ${user}`);
    if (loopUsers.length === 0 && options.attached === true && !loop.autoclear) {
      users.push(`${loop.path} attached`);
    }
  }
  return users;
}

async function readSysText(path: string): Promise<string | null> {
  try {
    return (await readFile(path, "utf8")).trim();
  } catch {
    return null;
  }
}

async function readSysNumber(path: string): Promise<number | null> {
  const text = await readSysText(path);
  if (text === null) return null;
  const value = Number.parseInt(text, 10);
  return Number.isSafeInteger(value) && value >= 0 ? value : null;
}

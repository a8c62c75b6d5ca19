/**
 * FileBackend: a regular file or a block device. Data goes through the page cache (no O_DIRECT: Node's
 * buffers are not aligned); FLUSH and FUA are fdatasync.
 *
 * Reads use the synchronous fs calls while the data comes from memory: a page-cache-hot pread costs a few
 * microseconds per 4 KiB, less than a hop through the libuv pool and back (measured in
 * docs/design/nbd-notes.md and docs/design/performance.md), and a read never waits for a frozen file
 * system. A large synchronous read that ran slower than memory (the device had to be read) sends this
 * backend's large reads to the pool for a while, so that a disk's latency does not stall the event loop
 * and several reads reach the device at once; a backend holds at most `poolSlotsPerFile` pool threads at
 * once (a CountingSemaphore). Every write, zeroing and resize goes to the thread of the backend's file system
 * (FileSystemWriter): a write to a file system under `fsfreeze -f` (or to a dying disk) blocks in the
 * kernel, and on the event loop it would stall every device and the control API until thaw. fdatasync runs
 * in the pool, one at a time per backend (on a frozen file system it finds nothing dirty to wait for).
 * close() waits for every request still out, so none ever runs on a reused descriptor.
 * The FUSE face reads /dev/fuse on its own thread, not the pool.
 *
 * A block device is opened exclusively (O_EXCL), like blksnap's storage and like a mounted file system
 * would be: nobody else may write around the tracker. Its size comes from the kernel
 * (/sys/class/block/<name>/size, in 512-byte sectors). A regular file is used at its current size, or
 * created / extended to `sizeBytes` when given.
 *
 * Not done yet: trim is accepted and ignored on files (NBD makes trim a hint; Node has no fallocate to
 * punch holes), so writeZeroes writes real zeroes, and extents() is not offered (Node has no SEEK_DATA).
 * Opening (open, stat, the first extension of a new file) is still synchronous: it happens when a device or
 * storage is added, not on the data path.
 */

import { randomUUID } from "node:crypto";
import * as fs from "node:fs";
import { basename, join } from "node:path";
import { promisify } from "node:util";
import type { BlockDevice, Capabilities, WriteFlags, ZeroFlags } from "../block/device.js";
import { BlockError, toBlockError } from "../block/errors.js";
import { assert } from "../util/assert.js";
import { CountingSemaphore } from "../util/counting-semaphore.js";
import { FileSystemWriter } from "./fs-writer.js";

const fdatasyncAsync = promisify(fs.fdatasync);
const readAsync = (fd: number, target: Uint8Array, offset: number, length: number, position: number) =>
  new Promise<number>((resolve, reject) =>
    fs.read(fd, target, offset, length, position, (error, bytesRead) =>
      error ? reject(error) : resolve(bytesRead),
    ),
  );
/**
 * Reads from this size up are timed when they run synchronously, and go to the libuv pool while the
 * backend is in its pool window (see slowReadMicrosOf). Below it a read always runs synchronously.
 */
export const asyncIoBytesMin = 64 * 1024;
const closeAsync = promisify(fs.close);
/**
 * A synchronous large read slower than this came from the device, not from the page cache (memory
 * copies run at several GB/s here; a read preempted by the scheduler may look slow too, which is why one
 * slow read decides nothing). 1 µs per KiB is 1 GB/s, plus a fixed allowance for the call itself.
 */
export function slowReadMicrosOf(lengthBytes: number): number {
  return 100 + lengthBytes / 1024;
}
/**
 * The share of recent large synchronous reads that were slow is a moving average (each read weighs
 * 1/16). Above `poolModeEnterShare` large reads go to the pool; there, every `poolProbeEvery`-th one
 * still runs synchronously as a probe, and below `poolModeLeaveShare` they all run synchronously again.
 * On this machine under load (load average 7), a page-cache read of 256 KiB takes 20 µs at the median and
 * over 1 ms at the 99th percentile (preempted); a cold device makes nearly all of them slow, so it
 * switches after about eleven reads and then blocks the loop for one read in sixteen. Leaving takes
 * about eleven fast probes (176 reads): a time-based probe left a warm-up's pool mode in place for
 * seconds.
 */
export const slowShareWeight = 1 / 16;
export const poolModeEnterShare = 0.5;
export const poolModeLeaveShare = 0.25;
export const poolProbeEvery = 16;
/** Zeroing goes to the writer thread in slices of this size. */
const zeroSliceBytes = 16 * 1024 * 1024;
/** Pool threads one file's large reads may hold at once (the libuv pool has 4). */
export const poolSlotsPerFile = 2;
const sectorSizeBytes = 512;
/** Linux O_TMPFILE (__O_TMPFILE | O_DIRECTORY); Node does not export it. */
const O_TMPFILE = 0o20000000 | 0o200000;

export interface FileBackendOptions {
  /** Create the file if absent and extend it to this size (regular files only). */
  readonly sizeBytes?: number;
  readonly readOnly?: boolean;
  /** Create the file, failing with EEXIST when it exists (a difference storage's named file). */
  readonly createNew?: boolean;
  /** Milliseconds of a monotonic clock, for the slow-read rule (tests); default performance.now. */
  readonly clock?: () => number;
}

export type FileKind = "file" | "block-device";

export class FileBackend implements BlockDevice {
  readonly path: string;
  readonly kind: FileKind;
  readonly sizeBytes: number;
  readonly capabilities: Capabilities;
  private fd: number;
  private closed = false;
  /** Moving share of large synchronous reads that were slow, and the mode it selects (see above). */
  private slowShare = 0;
  private isPoolMode = false;
  private readsToProbe = 0;
  private largeReadsInPool = 0;
  private readonly clock: () => number;
  private readonly poolSlots = new CountingSemaphore(poolSlotsPerFile);
  private readonly flushSlot = new CountingSemaphore(1);
  private readonly writer: FileSystemWriter;
  /** Writes and extensions sent to the writer and not answered yet (close waits for them). */
  private writesOut = 0;
  private writesIdle: Array<() => void> = [];

  private constructor(
    path: string,
    fd: number,
    kind: FileKind,
    sizeBytes: number,
    readOnly: boolean,
    clock: () => number = performance.now.bind(performance),
  ) {
    this.path = path;
    this.clock = clock;
    this.fd = fd;
    this.writer = FileSystemWriter.acquire(fileSystemKey(fd));
    this.kind = kind;
    this.sizeBytes = sizeBytes;
    this.capabilities = {
      canWrite: !readOnly,
      canFlush: !readOnly,
      canFua: !readOnly,
      canTrim: !readOnly,
      canZero: !readOnly,
      canFastZero: false,
      canExtents: false,
      canMultiConn: true,
    };
  }

  static open(path: string, options: FileBackendOptions = {}): FileBackend {
    const readOnly = options.readOnly ?? false;
    let stat: fs.Stats | undefined;
    try {
      stat = fs.statSync(path);
    } catch (error) {
      if ((error as NodeJS.ErrnoException).code !== "ENOENT" || options.sizeBytes === undefined) {
        throw toBlockError(error, `Cannot open backend ${JSON.stringify(path)}`);
      }
    }
    if (stat?.isBlockDevice()) {
      const sizeBytes = blockDeviceSizeBytes(path, stat);
      if (options.sizeBytes !== undefined && options.sizeBytes !== sizeBytes) {
        throw new BlockError(
          "EINVAL",
          `Cannot use block device ${JSON.stringify(path)} with size ${options.sizeBytes}: its size is ${sizeBytes}`,
        );
      }
      const flags = (readOnly ? fs.constants.O_RDONLY : fs.constants.O_RDWR) | fs.constants.O_EXCL;
      const fd = openOrThrow(path, flags);
      return new FileBackend(path, fd, "block-device", sizeBytes, readOnly, options.clock);
    }
    if (stat && !stat.isFile()) {
      throw new BlockError(
        "EINVAL",
        `Cannot open backend ${JSON.stringify(path)}: not a regular file or block device`,
      );
    }
    const flags = readOnly
      ? fs.constants.O_RDONLY
      : fs.constants.O_RDWR | fs.constants.O_CREAT | (options.createNew ? fs.constants.O_EXCL : 0);
    const fd = openOrThrow(path, flags);
    try {
      let sizeBytes = fs.fstatSync(fd).size;
      if (options.sizeBytes !== undefined && sizeBytes < options.sizeBytes) {
        if (readOnly)
          throw new BlockError("EROFS", `Cannot extend read-only backend ${JSON.stringify(path)}`);
        fs.ftruncateSync(fd, options.sizeBytes);
        sizeBytes = options.sizeBytes;
      }
      return new FileBackend(path, fd, "file", sizeBytes, readOnly, options.clock);
    } catch (error) {
      fs.closeSync(fd);
      throw toBlockError(error, `Cannot size backend ${JSON.stringify(path)}`);
    }
  }

  /**
   * An unnamed temporary file in `directory` (O_TMPFILE): it vanishes when closed or when the process dies,
   * so a crashed daemon leaves no difference storage behind. Falls back to create-and-unlink where the file
   * system has no O_TMPFILE.
   */
  static openAnonymous(directory: string, sizeBytes: number): FileBackend {
    let fd: number;
    try {
      fd = fs.openSync(directory, O_TMPFILE | fs.constants.O_RDWR, 0o600);
    } catch (error) {
      const code = (error as NodeJS.ErrnoException).code;
      if (code !== "EOPNOTSUPP" && code !== "EISDIR" && code !== "EINVAL") {
        throw toBlockError(error, `Cannot create a temporary file in ${JSON.stringify(directory)}`);
      }
      const path = join(directory, `.blocksnap-diff-${randomUUID()}`);
      fd = openOrThrow(path, fs.constants.O_RDWR | fs.constants.O_CREAT | fs.constants.O_EXCL);
      fs.unlinkSync(path);
    }
    try {
      fs.ftruncateSync(fd, sizeBytes);
    } catch (error) {
      fs.closeSync(fd);
      throw toBlockError(error, `Cannot size a temporary file in ${JSON.stringify(directory)}`);
    }
    return new FileBackend(join(directory, "(anonymous)"), fd, "file", sizeBytes, false);
  }

  directReadFd(): number | null {
    return this.closed ? null : this.fd;
  }

  async read(offsetBytes: number, target: Uint8Array): Promise<void> {
    const lengthBytes = target.byteLength;
    if (lengthBytes < asyncIoBytesMin) {
      this.readSync(offsetBytes, target);
      return;
    }
    if (!this.isPoolMode || this.readsToProbe === 0) {
      const startMs = this.clock();
      this.readSync(offsetBytes, target);
      this.noteSyncRead(lengthBytes, startMs);
      return;
    }
    this.readsToProbe--;
    this.checkOpen();
    let doneBytes: number;
    this.largeReadsInPool++;
    try {
      doneBytes = await this.poolSlots.run(() => {
        this.checkOpen();
        return readAsync(this.fd, target, 0, lengthBytes, offsetBytes);
      });
    } catch (error) {
      throw toBlockError(error, `read ${this.path} at ${offsetBytes}`);
    }
    // A short read (end of file) is rare: finish it on the synchronous path, which also zero-fills.
    if (doneBytes < lengthBytes) this.readSync(offsetBytes + doneBytes, target.subarray(doneBytes));
  }

  /** Updates the slow share with one large synchronous read and picks the mode for the next ones. */
  private noteSyncRead(lengthBytes: number, startMs: number): void {
    const endMs = this.clock();
    const isSlow = (endMs - startMs) * 1000 > slowReadMicrosOf(lengthBytes);
    this.slowShare += ((isSlow ? 1 : 0) - this.slowShare) * slowShareWeight;
    if (this.isPoolMode && this.slowShare < poolModeLeaveShare) this.isPoolMode = false;
    else if (!this.isPoolMode && this.slowShare > poolModeEnterShare) this.isPoolMode = true;
    if (this.isPoolMode) this.readsToProbe = poolProbeEvery - 1;
  }

  /** Large reads sent to the pool so far (the slow-read rule's effect, for tests and metrics). */
  get largeReadsSentToPool(): number {
    return this.largeReadsInPool;
  }

  readSync(offsetBytes: number, target: Uint8Array): void {
    this.checkOpen();
    let doneBytes = 0;
    try {
      while (doneBytes < target.byteLength) {
        const n = fs.readSync(
          this.fd,
          target,
          doneBytes,
          target.byteLength - doneBytes,
          offsetBytes + doneBytes,
        );
        if (n === 0) break;
        doneBytes += n;
      }
    } catch (error) {
      throw toBlockError(error, `read ${this.path} at ${offsetBytes}`);
    }
    // A file shorter than its device size reads as zeroes past its end; never leak old buffer bytes.
    if (doneBytes < target.byteLength) target.fill(0, doneBytes);
  }

  async write(offsetBytes: number, source: Uint8Array, flags?: WriteFlags): Promise<void> {
    this.checkOpen();
    await this.toWriter(
      this.writer.write(this.fd, offsetBytes, source),
      `write ${this.path} at ${offsetBytes}`,
    );
    if (flags?.fua) await this.flush();
  }

  /** Counts a request sent to the writer until it is answered, and names the file in its error. */
  private async toWriter(request: Promise<void>, what: string): Promise<void> {
    this.writesOut++;
    try {
      await request;
    } catch (error) {
      throw toBlockError(error, what);
    } finally {
      this.writesOut--;
      if (this.writesOut === 0) {
        const waiters = this.writesIdle;
        this.writesIdle = [];
        for (const wake of waiters) wake();
      }
    }
  }

  async writeZeroes(offsetBytes: number, lengthBytes: number, flags?: ZeroFlags): Promise<void> {
    if (flags?.fastZero) throw new BlockError("ENOTSUP", "fast zero is not supported by file backends");
    let doneBytes = 0;
    while (doneBytes < lengthBytes) {
      // Slices, so that other writes to the same file system run between them.
      const stepBytes = Math.min(zeroSliceBytes, lengthBytes - doneBytes);
      this.checkOpen();
      await this.toWriter(
        this.writer.writeZeroes(this.fd, offsetBytes + doneBytes, stepBytes),
        `write zeroes to ${this.path} at ${offsetBytes + doneBytes}`,
      );
      doneBytes += stepBytes;
    }
    if (flags?.fua) await this.flush();
  }

  async trim(_offsetBytes: number, _lengthBytes: number, flags?: WriteFlags): Promise<void> {
    this.checkOpen();
    if (flags?.fua) await this.flush();
  }

  async flush(): Promise<void> {
    this.checkOpen();
    try {
      await this.flushSlot.run(() => {
        this.checkOpen();
        return fdatasyncAsync(this.fd);
      });
    } catch (error) {
      throw toBlockError(error, `flush ${this.path}`);
    }
  }

  /** Extends a regular file (growth of a difference storage, in the pool like a write). */
  async extend(sizeBytes: number): Promise<void> {
    this.checkOpen();
    assert(this.kind === "file", "only regular files can be resized");
    await this.toWriter(this.writer.extend(this.fd, sizeBytes), `extend ${this.path} to ${sizeBytes}`);
  }

  /** Extends a regular file synchronously: only while a new storage is opened, never on the data path. */
  extendWhileOpening(sizeBytes: number): void {
    this.checkOpen();
    assert(this.kind === "file", "only regular files can be resized");
    try {
      fs.ftruncateSync(this.fd, sizeBytes);
    } catch (error) {
      throw toBlockError(error, `extend ${this.path} to ${sizeBytes}`);
    }
  }

  async close(): Promise<void> {
    if (this.closed) return;
    this.closed = true;
    // Requests still out use the descriptor: close it only when they are done.
    await this.poolSlots.idle();
    await this.flushSlot.idle();
    if (this.writesOut > 0) await new Promise<void>((resolve) => this.writesIdle.push(resolve));
    this.writer.release();
    const fd = this.fd;
    this.fd = -1;
    await closeAsync(fd);
  }

  get isClosed(): boolean {
    return this.closed;
  }

  private checkOpen(): void {
    if (this.closed) throw new BlockError("EIO", `${this.path} is closed`);
  }
}

/** Which FileSystemWriter serves a descriptor: its file system, or the block device itself. */
function fileSystemKey(fd: number): string {
  const stat = fs.fstatSync(fd);
  return stat.isBlockDevice() ? `block:${stat.rdev}` : `fs:${stat.dev}`;
}

function openOrThrow(path: string, flags: number): number {
  try {
    return fs.openSync(path, flags, 0o600);
  } catch (error) {
    throw toBlockError(error, `Cannot open ${JSON.stringify(path)}`);
  }
}

/** Size of a block device from the kernel: /sys/class/block/<name>/size counts 512-byte sectors. */
export function blockDeviceSizeBytes(path: string, stat: fs.Stats = fs.statSync(path)): number {
  assert(stat.isBlockDevice(), `${path} is not a block device`);
  const name = basename(fs.realpathSync(path));
  const major = Math.floor(stat.rdev / 256) & 0xfff;
  const minor = (stat.rdev & 0xff) | ((stat.rdev >> 12) & 0xfff00);
  const candidates = [`/sys/class/block/${name}/size`, `/sys/dev/block/${major}:${minor}/size`];
  for (const sysPath of candidates) {
    try {
      const sectors = Number.parseInt(fs.readFileSync(sysPath, "utf8").trim(), 10);
      if (Number.isSafeInteger(sectors) && sectors >= 0) return sectors * sectorSizeBytes;
    } catch {
      // Try the next way to the same attribute.
    }
  }
  throw new BlockError("ENODEV", `Cannot read the size of block device ${JSON.stringify(path)} from sysfs`);
}

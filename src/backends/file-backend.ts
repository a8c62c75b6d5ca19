/**
 * FileBackend: a regular file or a block device. Data goes through the page cache (no O_DIRECT: Node's
 * buffers are not aligned); FLUSH and FUA are fdatasync.
 *
 * Reads under 64 KiB use the synchronous fs calls: on page-cache-hot data a synchronous pread costs a few
 * microseconds, far less than a hop through the libuv pool (measured in docs/design/nbd-notes.md), and a
 * read never waits for a frozen file system. Larger reads go through the pool so that their copy overlaps
 * with the event loop; a backend holds at most `poolSlotsPerFile` pool threads at once (a
 * CountingSemaphore). Every write, zeroing and resize goes to the thread of the backend's file system
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
 * Large reads may go through the libuv pool, so that their copy overlaps with the event loop: sequential
 * reads at a deep queue reached qemu-nbd parity only this way. But a hop to a pool thread costs ~55 µs
 * here against ~9 µs for a synchronous 64 KiB page-cache read, so a read that is alone (queue depth 1,
 * a copy-before-write under a chunk lock) stays synchronous. "Not alone" means: another large read is
 * in the pool, or one already ran in this turn of the event loop (a burst parsed from one socket read).
 */
export const asyncIoBytesMin = 64 * 1024;
const closeAsync = promisify(fs.close);
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
}

export type FileKind = "file" | "block-device";

export class FileBackend implements BlockDevice {
  readonly path: string;
  readonly kind: FileKind;
  readonly sizeBytes: number;
  readonly capabilities: Capabilities;
  private fd: number;
  private closed = false;
  /** Large reads now in the libuv pool, and large ones run synchronously in this event-loop turn. */
  private poolInflight = 0;
  private largeInThisTurn = 0;
  private readonly poolSlots = new CountingSemaphore(poolSlotsPerFile);
  private readonly flushSlot = new CountingSemaphore(1);
  private readonly writer: FileSystemWriter;
  /** Writes and extensions sent to the writer and not answered yet (close waits for them). */
  private writesOut = 0;
  private writesIdle: Array<() => void> = [];

  private constructor(path: string, fd: number, kind: FileKind, sizeBytes: number, readOnly: boolean) {
    this.path = path;
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
      return new FileBackend(path, fd, "block-device", sizeBytes, readOnly);
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
      return new FileBackend(path, fd, "file", sizeBytes, readOnly);
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
    if (!this.goesToPool(target.byteLength)) {
      this.readSync(offsetBytes, target);
      return;
    }
    this.checkOpen();
    let doneBytes: number;
    this.poolInflight++;
    try {
      doneBytes = await this.poolSlots.run(() => {
        this.checkOpen();
        return readAsync(this.fd, target, 0, target.byteLength, offsetBytes);
      });
    } catch (error) {
      throw toBlockError(error, `read ${this.path} at ${offsetBytes}`);
    } finally {
      this.poolInflight--;
    }
    // A short read (end of file) is rare: finish it on the synchronous path, which also zero-fills.
    if (doneBytes < target.byteLength) this.readSync(offsetBytes + doneBytes, target.subarray(doneBytes));
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

  /** Whether a request of this size should go to the pool (see asyncIoBytesMin). */
  private goesToPool(lengthBytes: number): boolean {
    if (lengthBytes < asyncIoBytesMin) return false;
    if (this.poolInflight > 0 || this.largeInThisTurn > 0) return true;
    this.largeInThisTurn++;
    setImmediate(() => {
      this.largeInThisTurn = 0;
    });
    return false;
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

/**
 * One piece of a difference storage: a regular file, an anonymous temporary file, a block device, or RAM.
 * Regions are handed out sequentially from `filledBytes`; nothing is freed while the snapshot lives (each
 * chunk is stored once, as in blksnap). Growable areas (files, temp files, memory) are extended by the
 * DiffStorage that owns them; block devices and appended pieces keep their size.
 *
 * Chunk I/O goes through `io`, a StorageDevice: the opened file or RAM at first, and any stage put in front
 * of it with interpose() (a fault stage in tests), so storage errors can be injected like backend errors.
 * Growth, close and the descriptor stay with the opened `device` itself.
 */
import { realpathSync, statSync, unlinkSync } from "node:fs";
import { join } from "node:path";
import { FileBackend } from "../backends/file-backend.js";
import { MemoryBackend } from "../backends/memory-backend.js";
import type { BlockDevice } from "../block/device.js";
import { BlockError } from "../block/errors.js";
import { assert } from "../util/assert.js";

export type StorageAreaKind = "file" | "directory" | "block-device" | "memory";

/** What chunk I/O needs of an area's device: a BlockDevice (asynchronous, never on the event loop). */
export type StorageDevice = BlockDevice;

export const memoryStoragePath = "memory:";

/** What a snapshot record keeps of one area of its storage. */
export interface StorageAreaRecord {
  readonly kind: StorageAreaKind;
  readonly path: string;
  readonly filePath: string | null;
}
/** Regions start on 4 KiB boundaries so that storage I/O stays page aligned. */
export const regionAlignmentBytes = 4096;
export const regionAlignmentBytesMax = 1024 * 1024;
/** blksnap leaves the head of a storage unused so no tool mistakes it for a file system superblock. */
export const reservedHeadBytes = 4096;
/** Largest RAM area: the address space of the sparse MemoryBackend used for it. */
const memoryAreaSizeBytesMax = 2 ** 50;

export class StorageArea {
  readonly kind: StorageAreaKind;
  /** The path given by the user, or "memory:". */
  readonly path: string;
  /** Canonical path of the file or device (to refuse storage on a member device); null for RAM. */
  readonly realPath: string | null;
  /**
   * The file or device that holds the data, to open it again after a restart: the path of a file or
   * block device, the named file made in a directory; null for RAM and anonymous temporary files.
   */
  readonly filePath: string | null;
  readonly growable: boolean;
  readonly device: FileBackend | MemoryBackend;
  /** Where chunk reads and writes go: `device`, or a stage in front of it (interpose). */
  io: StorageDevice;
  capacityBytes: number;
  filledBytes: number;

  private constructor(options: {
    kind: StorageAreaKind;
    path: string;
    realPath: string | null;
    filePath: string | null;
    growable: boolean;
    device: FileBackend | MemoryBackend;
    capacityBytes: number;
  }) {
    this.kind = options.kind;
    this.path = options.path;
    this.realPath = options.realPath;
    this.filePath = options.filePath;
    this.growable = options.growable;
    this.device = options.device;
    this.io = options.device;
    this.capacityBytes = options.capacityBytes;
    this.filledBytes = options.kind === "memory" ? 0 : reservedHeadBytes;
  }

  /**
   * Opens `path` as storage. `sizeBytes` creates or extends a regular file, sizes a temp file or a memory
   * area; a block device is always used whole. In a directory, `fileName` makes a named file there (it
   * survives a restart and is removed at destroy), otherwise an anonymous temporary file.
   */
  static open(
    path: string,
    options: { sizeBytes?: number; growable: boolean; fileName?: string },
  ): StorageArea {
    if (path === memoryStoragePath) {
      const device = new MemoryBackend(memoryAreaSizeBytesMax);
      return new StorageArea({
        kind: "memory",
        path,
        realPath: null,
        filePath: null,
        growable: options.growable,
        device,
        capacityBytes: options.sizeBytes ?? 0,
      });
    }
    let stat: ReturnType<typeof statSync> | undefined;
    try {
      stat = statSync(path);
    } catch (error) {
      if ((error as NodeJS.ErrnoException).code !== "ENOENT") throw new BlockError("EINVAL", String(error));
    }
    if (stat?.isDirectory()) {
      const filePath = options.fileName === undefined ? null : join(path, options.fileName);
      const device =
        filePath === null
          ? FileBackend.openAnonymous(path, options.sizeBytes ?? 0)
          : FileBackend.open(filePath, { sizeBytes: options.sizeBytes ?? 0, createNew: true });
      return new StorageArea({
        kind: "directory",
        path,
        realPath: realpathSync(path),
        filePath,
        growable: options.growable,
        device,
        capacityBytes: options.sizeBytes ?? 0,
      });
    }
    if (stat && !stat.isFile() && !stat.isBlockDevice()) {
      throw new BlockError(
        "EINVAL",
        `Cannot use ${JSON.stringify(path)} as storage: not a file, directory or device`,
      );
    }
    const device = FileBackend.open(path, {
      sizeBytes: stat?.isBlockDevice() ? undefined : (options.sizeBytes ?? (stat ? undefined : 0)),
    });
    const isBlockDevice = device.kind === "block-device";
    const capacityBytes = isBlockDevice
      ? device.sizeBytes
      : Math.max(device.sizeBytes, options.sizeBytes ?? 0);
    return new StorageArea({
      kind: isBlockDevice ? "block-device" : "file",
      path,
      realPath: realpathSync(path),
      filePath: path,
      growable: options.growable && !isBlockDevice,
      device,
      capacityBytes,
    });
  }

  /**
   * Opens an area again after a restart, at the size its file has now, with `filledBytes` in use (the end of
   * the last region its snapshot recorded).
   */
  static reopen(record: StorageAreaRecord, options: { growable: boolean; filledBytes: number }): StorageArea {
    if (record.kind === "memory" || record.filePath === null)
      throw new BlockError(
        "ENOENT",
        `The storage ${JSON.stringify(record.path)} kept no data across the restart`,
      );
    const device = FileBackend.open(record.filePath);
    const isBlockDevice = device.kind === "block-device";
    if (isBlockDevice !== (record.kind === "block-device")) {
      void device.close();
      throw new BlockError(
        "EINVAL",
        `The storage ${JSON.stringify(record.filePath)} is no longer a ${record.kind}`,
      );
    }
    const area = new StorageArea({
      kind: record.kind,
      path: record.path,
      realPath: realpathSync(record.filePath),
      filePath: record.filePath,
      growable: options.growable && !isBlockDevice,
      device,
      capacityBytes: device.sizeBytes,
    });
    if (options.filledBytes > area.capacityBytes) {
      void device.close();
      throw new BlockError(
        "EINVAL",
        `The storage ${JSON.stringify(record.filePath)} is shorter (${area.capacityBytes} bytes) than its recorded chunks (${options.filledBytes})`,
      );
    }
    area.filledBytes = Math.max(area.filledBytes, options.filledBytes);
    return area;
  }

  /** What a snapshot record keeps of this area to open it again. */
  get record(): StorageAreaRecord {
    return { kind: this.kind, path: this.path, filePath: this.filePath };
  }

  /** Removes the named file this area made in a directory (destroy); other kinds keep their file. */
  removeOwnFile(): void {
    if (this.kind !== "directory" || this.filePath === null) return;
    try {
      unlinkSync(this.filePath);
    } catch (error) {
      if ((error as NodeJS.ErrnoException).code !== "ENOENT") throw error;
    }
  }

  /** Puts a stage in front of the area's chunk I/O (it wraps whatever is there now). */
  interpose(stage: (device: StorageDevice) => StorageDevice): void {
    this.io = stage(this.io);
  }

  get freeBytes(): number {
    return Math.max(0, this.capacityBytes - this.filledBytes);
  }

  /** Whether `lengthBytes` fits at the next aligned offset. */
  fits(lengthBytes: number): boolean {
    return alignUp(this.filledBytes, regionAlignmentFor(lengthBytes)) + lengthBytes <= this.capacityBytes;
  }

  /** Reserves `lengthBytes` at the next aligned offset, or returns undefined when it does not fit. */
  tryAllocate(lengthBytes: number): number | undefined {
    assert(lengthBytes > 0);
    const offsetBytes = alignUp(this.filledBytes, regionAlignmentFor(lengthBytes));
    if (offsetBytes + lengthBytes > this.capacityBytes) return undefined;
    this.filledBytes = offsetBytes + lengthBytes;
    return offsetBytes;
  }

  /**
   * Raises the capacity of a growable area (extends the file in the pool; RAM pages come on first write).
   * The new space is handed out only once the file has been extended.
   */
  async grow(newCapacityBytes: number): Promise<void> {
    assert(this.growable, "only growable areas grow");
    assert(newCapacityBytes > this.capacityBytes, "growth must add capacity");
    if (this.device instanceof FileBackend) await this.device.extend(newCapacityBytes);
    this.capacityBytes = Math.max(this.capacityBytes, newCapacityBytes);
  }

  /** Growth while the storage is being opened (synchronous, like the open itself). */
  growWhileOpening(newCapacityBytes: number): void {
    assert(this.growable, "only growable areas grow");
    assert(newCapacityBytes > this.capacityBytes, "growth must add capacity");
    if (this.device instanceof FileBackend) this.device.extendWhileOpening(newCapacityBytes);
    this.capacityBytes = newCapacityBytes;
  }

  async close(): Promise<void> {
    if (this.device instanceof FileBackend) await this.device.close();
  }
}

/**
 * Regions start on a boundary of their own size (a power of two up to 1 MiB, at least 4 KiB): a chunk
 * stored at "4 KiB + k x chunk" made image reads of preserved chunks 1.3-1.6x slower than aligned ones.
 */
export function regionAlignmentFor(lengthBytes: number): number {
  const largestPowerOfTwo = 2 ** Math.floor(Math.log2(lengthBytes));
  return Math.max(regionAlignmentBytes, Math.min(largestPowerOfTwo, regionAlignmentBytesMax));
}

function alignUp(value: number, alignment: number): number {
  return Math.ceil(value / alignment) * alignment;
}

/**
 * DiffStorage: the difference storage of one snapshot, shared by all its devices (blksnap's diff_storage).
 *
 * It is a list of StorageAreas. The first comes from `--storage` (a file, a temp file in a directory, a
 * block device, or RAM); `appendStorage` adds more (blksnap v1's stretch flow). Regions are allocated
 * sequentially; each chunk is stored once and nothing is freed before destroy.
 *
 * Limit and growth (docs/design/semantics.md): the first area grows in portions (default 64 MiB) while the total
 * capacity is below `limitBytes`. After each allocation, when free space drops below half a portion, a
 * `low_space {freeBytes}` event is emitted once per crossing and the area grows by
 * min(portion, limit - capacity). When growth is impossible (limit reached, or a block device) a single
 * `no_space {requestedBytes}` event says how much capacity would have been needed. An allocation that
 * does not fit anywhere throws ENOSPC; the caller decides whether that corrupts the snapshot or fails the
 * origin write.
 *
 * No storage I/O runs on the event loop (a storage on a frozen or dying file system must stall only the
 * snapshot that uses it): writes, flushes and growth go through the file backend's bounded pool slots.
 * Growth is an ftruncate in the pool; one growth runs at a time (`growing`), new space is handed out only
 * after the file was extended, and an allocation that needs the growth waits for it. The low-space
 * growth starts in the background, so the allocation that crosses the threshold does not wait for it.
 *
 * Failed writes: a region whose first write failed is given back (`release`) and reused by the next
 * allocation of the same length, so failed copies do not leak space; the real errno of a failed write or
 * growth is reported once per errno (an `io_error` event) until a write succeeds again.
 *
 * Not done yet: space is not reserved with fallocate (Node has none), so a full host file system
 * surfaces as an ENOSPC write error later, which corrupts the snapshot like any storage error.
 */
import { FileBackend } from "../backends/file-backend.js";
import { BlockError, type Errno, toBlockError } from "../block/errors.js";
import { assert } from "../util/assert.js";
import {
  regionAlignmentFor,
  StorageArea,
  type StorageAreaRecord,
  type StorageDevice,
} from "./storage-area.js";

export const growthPortionBytesDefault = 64 * 1024 * 1024;
/** Bounds of the location encoding (locationCode): areas per storage and bytes per area. */
export const areasMax = 255;
const areaOffsetBytesLimit = 2 ** 45;

/** Regions given back by failed writes kept for reuse; beyond this they stay lost (and counted). */
const releasedRegionsMax = 1024;

export type StorageEvent =
  | { readonly type: "low_space"; readonly freeBytes: number }
  | { readonly type: "no_space"; readonly requestedBytes: number }
  | { readonly type: "io_error"; readonly errno: Errno; readonly message: string };

export interface StorageLocation {
  readonly area: StorageArea;
  readonly offsetBytes: number;
}

export interface DiffStorageOptions {
  readonly path: string;
  readonly limitBytes: number;
  readonly growthPortionBytes?: number;
  readonly onEvent?: (event: StorageEvent) => void;
  /** A stage put in front of every area's chunk I/O, appended areas too (fault injection in tests). */
  readonly areaStage?: (device: StorageDevice) => StorageDevice;
  /**
   * Names the file made in a directory for area number `areaIndex` (a snapshot that must survive a restart);
   * without it a directory gets an anonymous temporary file that vanishes with the process.
   */
  readonly areaFileName?: (areaIndex: number) => string;
}

/** An area to open again after a restart, with the end of the last region recorded in it. */
export interface ReopenedArea {
  readonly record: StorageAreaRecord;
  readonly filledBytes: number;
}

export interface StorageInfo {
  readonly kind: "file" | "directory" | "block-device" | "memory" | "mixed";
  readonly paths: readonly string[];
  readonly usedBytes: number;
  readonly capacityBytes: number;
  readonly limitBytes: number;
}

export class DiffStorage {
  readonly limitBytes: number;
  readonly growthPortionBytes: number;
  private readonly areas: StorageArea[] = [];
  private readonly onEvent: (event: StorageEvent) => void;
  private readonly areaStage: ((device: StorageDevice) => StorageDevice) | undefined;
  private readonly areaFileName: ((areaIndex: number) => string) | undefined;
  private lowSpaceSignalled = false;
  private noSpaceSignalled = false;
  private closed = false;
  /** The growth in progress, if any (one at a time). */
  private growing: Promise<void> | null = null;
  /** Regions released after a failed write, by length, for reuse. */
  private readonly released = new Map<number, StorageLocation[]>();
  private releasedCount = 0;
  private releasedBytes = 0;
  /** Errnos already reported by an io_error event since the last successful write. */
  private readonly reportedErrnos = new Set<Errno>();

  constructor(options: DiffStorageOptions, reopened?: readonly ReopenedArea[]) {
    assert(
      Number.isSafeInteger(options.limitBytes) && options.limitBytes > 0,
      "limit must be validated by caller",
    );
    this.limitBytes = options.limitBytes;
    this.growthPortionBytes = options.growthPortionBytes ?? growthPortionBytesDefault;
    assert(this.growthPortionBytes > 0);
    this.onEvent = options.onEvent ?? (() => {});
    this.areaStage = options.areaStage;
    this.areaFileName = options.areaFileName;
    if (reopened) {
      this.reopenAreas(reopened);
      return;
    }
    const area = StorageArea.open(options.path, {
      growable: true,
      ...(this.areaFileName ? { fileName: this.areaFileName(0) } : {}),
    });
    if (this.areaStage) area.interpose(this.areaStage);
    try {
      clampToEncodable(area);
      this.areas.push(area);
      // blksnap sizes a small storage at create: grow it to the first portion right away.
      if (area.growable && area.capacityBytes <= this.growthPortionBytes / 2) {
        const newCapacityBytes = this.grownCapacity(area, this.growthPortionBytes);
        if (newCapacityBytes > area.capacityBytes) area.growWhileOpening(newCapacityBytes);
      }
    } catch (error) {
      // The constructor fails, so nobody will close() this storage: release what it opened here.
      void area.close();
      throw error;
    }
  }

  /**
   * A storage opened again after a restart, from its areas' records (the first is the growable one).
   * Whatever fails closes what was opened.
   */
  static reopen(options: Omit<DiffStorageOptions, "path">, areas: readonly ReopenedArea[]): DiffStorage {
    const first = areas[0];
    if (!first) throw new BlockError("EINVAL", "a difference storage has at least one area");
    return new DiffStorage({ ...options, path: first.record.path }, areas);
  }

  private reopenAreas(reopened: readonly ReopenedArea[]): void {
    try {
      for (const [index, entry] of reopened.entries()) {
        const area = StorageArea.reopen(entry.record, {
          growable: index === 0,
          filledBytes: entry.filledBytes,
        });
        this.areas.push(area);
        if (this.areaStage) area.interpose(this.areaStage);
        clampToEncodable(area);
      }
    } catch (error) {
      for (const area of this.areas) void area.close();
      throw error;
    }
  }

  /** What a snapshot record keeps of the areas, in order. */
  get areaRecords(): StorageAreaRecord[] {
    return this.areas.map((area) => area.record);
  }

  /**
   * Checks a location code read from a record: a known area, an offset past the reserved head, and the
   * region within the area. EINVAL otherwise (never an assertion: records come from disk).
   */
  checkRecordedLocation(code: number, lengthBytes: number): void {
    const areaIndex = Math.floor(code / areaOffsetBytesLimit);
    const area = Number.isSafeInteger(code) && code >= 0 ? this.areas[areaIndex] : undefined;
    const offsetBytes = code - areaIndex * areaOffsetBytesLimit;
    if (!area || offsetBytes + lengthBytes > area.capacityBytes)
      throw new BlockError("EINVAL", `recorded location ${code} is outside the difference storage`);
  }

  get paths(): string[] {
    return this.areas.map((area) => area.path);
  }

  /** Canonical paths of the files and devices used (to refuse storage on a snapshot member). */
  get realPaths(): string[] {
    return this.areas.flatMap((area) => (area.realPath ? [area.realPath] : []));
  }

  /** The open descriptors of the file and device areas (to check what was really opened). */
  get fileDescriptors(): number[] {
    return this.areas.flatMap((area) => {
      const fd = area.device instanceof FileBackend ? area.device.directReadFd() : null;
      return fd === null ? [] : [fd];
    });
  }

  /**
   * Whether chunk data is best handed to write() in SharedArrayBuffer-backed memory: a file or device
   * area's writer thread writes such a source where it is instead of copying it first; a RAM area copies
   * every source, and from shared memory that copy is a slower one.
   */
  get prefersSharedSources(): boolean {
    return this.areas.some((area) => area.device instanceof FileBackend);
  }

  get capacityBytes(): number {
    return this.areas.reduce((sum, area) => sum + area.capacityBytes, 0);
  }

  get usedBytes(): number {
    const filledBytes = this.areas.reduce(
      (sum, area) => sum + Math.min(area.filledBytes, area.capacityBytes),
      0,
    );
    return filledBytes - this.releasedBytes;
  }

  get freeBytes(): number {
    return this.areas.reduce((sum, area) => sum + area.freeBytes, 0) + this.releasedBytes;
  }

  info(): StorageInfo {
    const kinds = new Set(this.areas.map((area) => area.kind));
    const [onlyKind] = kinds;
    return {
      kind: kinds.size === 1 && onlyKind ? onlyKind : "mixed",
      paths: this.paths,
      usedBytes: this.usedBytes,
      capacityBytes: this.capacityBytes,
      limitBytes: this.limitBytes,
    };
  }

  /**
   * A location as one number, so a chunk map holds a number per chunk instead of an object: the area's
   * place in this storage times 2^45 plus the offset (areas up to 32 TiB, up to 255 areas; exact in a double).
   */
  locationCode(location: StorageLocation): number {
    const areaIndex = this.areas.indexOf(location.area);
    assert(areaIndex >= 0 && areaIndex < areasMax, "location of another storage");
    assert(location.offsetBytes >= 0 && location.offsetBytes < areaOffsetBytesLimit, "offset beyond 32 TiB");
    return areaIndex * areaOffsetBytesLimit + location.offsetBytes;
  }

  locationAt(code: number): StorageLocation {
    assert(Number.isSafeInteger(code) && code >= 0, "invalid location code");
    const areaIndex = Math.floor(code / areaOffsetBytesLimit);
    const area = this.areas[areaIndex];
    assert(area, "location code of an unknown area");
    return { area, offsetBytes: code - areaIndex * areaOffsetBytesLimit };
  }

  /** Whether one region of `lengthBytes` fits now or after growth (checked at take, like blksnap's EFAULT). */
  canHold(lengthBytes: number): boolean {
    if (this.closed) return false;
    if (this.areas.some((area) => area.fits(lengthBytes))) return true;
    const first = this.areas[0];
    assert(first);
    return (
      first.growable && this.limitBytes - this.capacityBytes >= lengthBytes + regionAlignmentFor(lengthBytes)
    );
  }

  /**
   * Reserves a region; throws ENOSPC when neither free space nor growth can hold it. Waits for a growth
   * when the region fits only after it.
   */
  async allocate(lengthBytes: number): Promise<StorageLocation> {
    assert(Number.isSafeInteger(lengthBytes) && lengthBytes > 0);
    this.checkOpen();
    let location = this.tryAllocate(lengthBytes);
    while (!location) {
      const first = this.areas[0];
      assert(first);
      if (!first.growable || this.capacityBytes >= this.limitBytes) break;
      const capacityBefore = this.capacityBytes;
      await this.grow(first, Math.max(this.growthPortionBytes, lengthBytes + 2 * 4096));
      this.checkOpen();
      location = this.tryAllocate(lengthBytes);
      if (!location && this.capacityBytes === capacityBefore && this.growing === null) break;
    }
    if (!location) {
      this.signalNoSpace(lengthBytes);
      throw new BlockError(
        "ENOSPC",
        `difference storage is full: ${this.usedBytes} of ${this.capacityBytes} bytes used, limit ${this.limitBytes}`,
      );
    }
    this.checkLowSpace();
    return location;
  }

  /**
   * Gives back a region from allocate() whose data never became valid (its write failed): the next
   * allocation of the same length reuses it.
   */
  release(location: StorageLocation, lengthBytes: number): void {
    if (this.closed || this.releasedCount >= releasedRegionsMax) return;
    let regions = this.released.get(lengthBytes);
    if (!regions) {
      regions = [];
      this.released.set(lengthBytes, regions);
    }
    regions.push(location);
    this.releasedCount++;
    this.releasedBytes += lengthBytes;
  }

  async read(location: StorageLocation, offsetInRegionBytes: number, target: Uint8Array): Promise<void> {
    if (this.closed) throw new BlockError("EIO", "difference storage is closed");
    await location.area.io.read(location.offsetBytes + offsetInRegionBytes, target);
  }

  /**
   * Storage writes go through the pool (see the design notes): a hop costs more than the synchronous
   * write it replaced on page-cache-hot storage, but a frozen storage no longer stalls the daemon.
   */
  async write(location: StorageLocation, offsetInRegionBytes: number, source: Uint8Array): Promise<void> {
    this.checkOpen();
    try {
      await location.area.io.write(location.offsetBytes + offsetInRegionBytes, source);
    } catch (error) {
      const blockError = toBlockError(error, `write to the difference storage ${location.area.path}`);
      this.reportIoError(blockError);
      throw blockError;
    }
    if (this.reportedErrnos.size > 0) this.reportedErrnos.clear();
  }

  async flush(): Promise<void> {
    if (this.closed) throw new BlockError("EIO", "difference storage is closed");
    await Promise.all(this.areas.map((area) => area.io.flush()));
  }

  /** Adds a file, temp file, device or RAM area to a live storage. */
  append(path: string, sizeBytes?: number): StorageArea {
    const area = this.openArea(path, sizeBytes);
    this.appendArea(area);
    return area;
  }

  /** Opens an area for appendArea() without adding it yet (the engine checks what was opened first). */
  openArea(path: string, sizeBytes?: number): StorageArea {
    if (this.closed) throw new BlockError("EIO", "difference storage is closed");
    if (this.areas.length >= areasMax) throw new BlockError("ENOSPC", `At most ${areasMax} storage areas`);
    const area = StorageArea.open(path, {
      sizeBytes: sizeBytes ?? this.growthPortionBytes,
      growable: false,
      ...(this.areaFileName ? { fileName: this.areaFileName(this.areas.length) } : {}),
    });
    clampToEncodable(area);
    if (area.capacityBytes <= area.filledBytes) {
      void area.close();
      throw new BlockError("EINVAL", `Cannot append ${JSON.stringify(path)}: it holds no usable space`);
    }
    return area;
  }

  /** Adds an area from openArea(); closes it and fails when the storage was closed meanwhile. */
  appendArea(area: StorageArea): void {
    if (this.closed || this.areas.length >= areasMax) {
      void area.close();
      if (this.closed) throw new BlockError("EIO", "difference storage is closed");
      throw new BlockError("ENOSPC", `At most ${areasMax} storage areas`);
    }
    if (this.areaStage) area.interpose(this.areaStage);
    this.areas.push(area);
    if (this.freeBytes >= this.growthPortionBytes / 2) {
      this.lowSpaceSignalled = false;
      this.noSpaceSignalled = false;
    }
  }

  /** Closes every area; `removeFiles` also removes the named files made in directories (destroy). */
  async close(options: { readonly removeFiles?: boolean } = {}): Promise<void> {
    if (this.closed) return;
    this.closed = true;
    await Promise.all(this.areas.map((area) => area.close()));
    if (options.removeFiles) for (const area of this.areas) area.removeOwnFile();
  }

  private checkOpen(): void {
    if (this.closed) throw new BlockError("EIO", "difference storage is closed");
  }

  private reportIoError(error: BlockError): void {
    if (this.reportedErrnos.has(error.errno)) return;
    this.reportedErrnos.add(error.errno);
    this.onEvent({ type: "io_error", errno: error.errno, message: error.message });
  }

  private tryAllocate(lengthBytes: number): StorageLocation | undefined {
    const reused = this.released.get(lengthBytes)?.pop();
    if (reused) {
      this.releasedCount--;
      this.releasedBytes -= lengthBytes;
      return reused;
    }
    for (const area of this.areas) {
      const offsetBytes = area.tryAllocate(lengthBytes);
      if (offsetBytes !== undefined) return { area, offsetBytes };
    }
    return undefined;
  }

  private checkLowSpace(): void {
    const threshold = this.growthPortionBytes / 2;
    if (this.freeBytes >= threshold) {
      this.lowSpaceSignalled = false;
      return;
    }
    if (this.lowSpaceSignalled) return;
    this.lowSpaceSignalled = true;
    this.onEvent({ type: "low_space", freeBytes: this.freeBytes });
    const first = this.areas[0];
    assert(first);
    if (first.growable && this.capacityBytes < this.limitBytes) {
      // In the background: errors are reported by grow(), and an allocation that needs it waits for it.
      void this.grow(first, this.growthPortionBytes)
        .then(() => {
          if (this.freeBytes >= threshold) this.lowSpaceSignalled = false;
        })
        .catch(() => {});
    } else {
      this.signalNoSpace(this.growthPortionBytes);
    }
  }

  private signalNoSpace(wantedBytes: number): void {
    if (this.noSpaceSignalled) return;
    this.noSpaceSignalled = true;
    this.onEvent({ type: "no_space", requestedBytes: this.capacityBytes + wantedBytes });
  }

  /** Capacity of `area` after growing by up to `wantedBytes` within the limit and the location encoding. */
  private grownCapacity(area: StorageArea, wantedBytes: number): number {
    const roomBytes = this.limitBytes - this.capacityBytes;
    if (roomBytes <= 0) return area.capacityBytes;
    const stepBytes = Math.min(wantedBytes, roomBytes);
    return Math.min(area.capacityBytes + stepBytes, areaOffsetBytesLimit);
  }

  /**
   * Grows `area` by up to `wantedBytes`, or waits for the growth already running (the caller checks
   * again whether its region fits). A failed growth is reported with its errno and thrown.
   */
  private async grow(area: StorageArea, wantedBytes: number): Promise<void> {
    if (this.growing) {
      await this.growing;
      return;
    }
    const newCapacityBytes = this.grownCapacity(area, wantedBytes);
    if (newCapacityBytes <= area.capacityBytes) return;
    const growing = area.grow(newCapacityBytes).catch((error: unknown) => {
      const blockError = toBlockError(error, `growth of the difference storage ${area.path}`);
      this.reportIoError(blockError);
      throw blockError;
    });
    this.growing = growing;
    try {
      await growing;
    } finally {
      this.growing = null;
    }
  }
}

/** The area and offset a location code names (no check: see checkRecordedLocation). */
export function decodeLocationCode(code: number): { areaIndex: number; offsetBytes: number } {
  const areaIndex = Math.floor(code / areaOffsetBytesLimit);
  return { areaIndex, offsetBytes: code - areaIndex * areaOffsetBytesLimit };
}

/** Uses at most the first 32 TiB of an area, the most a location code can address. */
function clampToEncodable(area: StorageArea): void {
  if (area.capacityBytes > areaOffsetBytesLimit) area.capacityBytes = areaOffsetBytesLimit;
}

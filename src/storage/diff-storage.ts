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
 * Growth is a synchronous ftruncate (cheap) done inside the allocation, so no allocation ever races a
 * grow. Not done yet: space is not reserved with fallocate (Node has none), so a full host file system
 * surfaces as an EIO/ENOSPC write error later, which corrupts the snapshot like any storage error.
 */
import { FileBackend } from "../backends/file-backend.js";
import { BlockError } from "../block/errors.js";
import { assert } from "../util/assert.js";
import { regionAlignmentFor, StorageArea, type StorageDevice } from "./storage-area.js";

export const growthPortionBytesDefault = 64 * 1024 * 1024;
/** Bounds of the location encoding (locationCode): areas per storage and bytes per area. */
export const areasMax = 255;
const areaOffsetBytesLimit = 2 ** 45;

export type StorageEvent =
  | { readonly type: "low_space"; readonly freeBytes: number }
  | { readonly type: "no_space"; readonly requestedBytes: number };

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
  private lowSpaceSignalled = false;
  private noSpaceSignalled = false;
  private closed = false;

  constructor(options: DiffStorageOptions) {
    assert(
      Number.isSafeInteger(options.limitBytes) && options.limitBytes > 0,
      "limit must be validated by caller",
    );
    this.limitBytes = options.limitBytes;
    this.growthPortionBytes = options.growthPortionBytes ?? growthPortionBytesDefault;
    assert(this.growthPortionBytes > 0);
    this.onEvent = options.onEvent ?? (() => {});
    this.areaStage = options.areaStage;
    const area = StorageArea.open(options.path, { growable: true });
    if (this.areaStage) area.interpose(this.areaStage);
    try {
      clampToEncodable(area);
      this.areas.push(area);
      // blksnap sizes a small storage at create: grow it to the first portion right away.
      if (area.growable && area.capacityBytes <= this.growthPortionBytes / 2)
        this.growBy(area, this.growthPortionBytes);
    } catch (error) {
      // The constructor fails, so nobody will close() this storage: release what it opened here.
      void area.close();
      throw error;
    }
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

  get capacityBytes(): number {
    return this.areas.reduce((sum, area) => sum + area.capacityBytes, 0);
  }

  get usedBytes(): number {
    return this.areas.reduce((sum, area) => sum + Math.min(area.filledBytes, area.capacityBytes), 0);
  }

  get freeBytes(): number {
    return this.areas.reduce((sum, area) => sum + area.freeBytes, 0);
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

  /** Reserves a region; throws ENOSPC when neither free space nor growth can hold it. */
  allocate(lengthBytes: number): StorageLocation {
    assert(Number.isSafeInteger(lengthBytes) && lengthBytes > 0);
    if (this.closed) throw new BlockError("EIO", "difference storage is closed");
    let location = this.tryAllocate(lengthBytes);
    if (!location) {
      const first = this.areas[0];
      assert(first);
      if (first.growable && this.capacityBytes < this.limitBytes) {
        this.growBy(first, Math.max(this.growthPortionBytes, lengthBytes + 2 * 4096));
        location = this.tryAllocate(lengthBytes);
      }
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

  async read(location: StorageLocation, offsetInRegionBytes: number, target: Uint8Array): Promise<void> {
    if (this.closed) throw new BlockError("EIO", "difference storage is closed");
    await location.area.io.read(location.offsetBytes + offsetInRegionBytes, target);
  }

  /**
   * Storage writes are synchronous: they sit on the copy-before-write path of an origin write that waits
   * for them under a chunk lock, where a hop through the libuv pool cost a quarter of the IOPS of 4 KiB
   * first-touch writes (measured with 64 KiB and 256 KiB chunks).
   */
  async write(location: StorageLocation, offsetInRegionBytes: number, source: Uint8Array): Promise<void> {
    if (this.closed) throw new BlockError("EIO", "difference storage is closed");
    location.area.io.writeSync(location.offsetBytes + offsetInRegionBytes, source);
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
    const area = StorageArea.open(path, { sizeBytes: sizeBytes ?? this.growthPortionBytes, growable: false });
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

  async close(): Promise<void> {
    if (this.closed) return;
    this.closed = true;
    await Promise.all(this.areas.map((area) => area.close()));
  }

  private tryAllocate(lengthBytes: number): StorageLocation | undefined {
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
      this.growBy(first, this.growthPortionBytes);
      if (this.freeBytes >= threshold) this.lowSpaceSignalled = false;
    } else {
      this.signalNoSpace(this.growthPortionBytes);
    }
  }

  private signalNoSpace(wantedBytes: number): void {
    if (this.noSpaceSignalled) return;
    this.noSpaceSignalled = true;
    this.onEvent({ type: "no_space", requestedBytes: this.capacityBytes + wantedBytes });
  }

  private growBy(area: StorageArea, wantedBytes: number): void {
    const roomBytes = this.limitBytes - this.capacityBytes;
    if (roomBytes <= 0) return;
    const stepBytes = Math.min(wantedBytes, roomBytes);
    const newCapacityBytes = Math.min(area.capacityBytes + stepBytes, areaOffsetBytesLimit);
    if (newCapacityBytes > area.capacityBytes) area.grow(newCapacityBytes);
  }
}

/** Uses at most the first 32 TiB of an area, the most a location code can address. */
function clampToEncodable(area: StorageArea): void {
  if (area.capacityBytes > areaOffsetBytesLimit) area.capacityBytes = areaOffsetBytesLimit;
}

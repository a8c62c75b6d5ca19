/**
 * Engine: the registry of origin devices and snapshots, and blocksnap's public library API. The daemon's
 * control API and the CLI are thin layers over it; the NBD and FUSE faces read its exports through the
 * ExportSource interface.
 *
 * Each device is a backend (FileBackend, or MemoryBackend for `memory:`) under a Tracker that owns its CBT
 * map. Exports: the origin `<device>` (the tracker) and, per taken snapshot, the image
 * `<device>@<snapshot-id>`; both are wrapped in a CheckedDevice. Every operation validates all of its
 * input before changing anything, so a refused call leaves no trace. Errors are BlockErrors with an errno.
 *
 * Concurrency: control operations are synchronous where they can be; take and destroy are serialised per
 * snapshot. Not done yet: persistence of CBT maps across restarts (the daemon persists the device list).
 *
 * @example
 * const engine = new Engine();
 * await engine.addDevice({ name: "disk0", backendPath: "memory:", sizeBytes: 64 << 20 });
 * const snapshot = await engine.createSnapshot({ storage: "memory:", limitBytes: 16 << 20, devices: ["disk0"] });
 * await engine.takeSnapshot(snapshot.id);
 * const image = engine.findExport(`disk0@${snapshot.id}`)!.device; // reads return the state at take
 */

import { randomUUID } from "node:crypto";
import { totalmem } from "node:os";
import { FileBackend } from "../backends/file-backend.js";
import { MemoryBackend } from "../backends/memory-backend.js";
import { CheckedDevice } from "../block/checked-device.js";
import type { BlockDevice } from "../block/device.js";
import { BlockError, toBlockError } from "../block/errors.js";
import type { ChangedBlocks, Export, ExportSource } from "../block/export-source.js";
import type { CbtInfo } from "../cbt/cbt-map.js";
import { CbtMap, type CbtState } from "../cbt/cbt-map.js";
import { Tracker } from "../cow/tracker.js";
import type { StorageInfo } from "../storage/diff-storage.js";
import { DiffStorage, decodeLocationCode } from "../storage/diff-storage.js";
import { memoryStoragePath, type StorageArea, type StorageDevice } from "../storage/storage-area.js";
import { assert } from "../util/assert.js";
import { type Logger, silentLogger } from "../util/logger.js";
import { type Admission, BackendClaims, type PathPolicy } from "./backend-claims.js";
import { devicesMax, markDirtyBlocksPerSlice, memoryDevicesRamShare, snapshotsMax } from "./engine-limits.js";
import type {
  AppendStorageOptions,
  ByteRange,
  DeviceAddOptions,
  DeviceInfo,
  SnapshotCreateOptions,
  SnapshotEvent,
  SnapshotInfo,
  SnapshotPersistence,
  SnapshotRecord,
  SnapshotRestore,
  TakeOptions,
} from "./engine-types.js";
import {
  checkDeviceAddOptions,
  checkRange,
  checkSnapshotCreateOptions,
  checkTakeOptions,
  checkWaitTimeout,
} from "./engine-validation.js";
import type { EventRead } from "./event-log.js";
import type { Freezer } from "./freezer.js";
import { checkDeviceName, imageExportName } from "./names.js";
import { Snapshot } from "./snapshot.js";

export const memoryBackendPath = "memory:";

export interface EngineOptions {
  readonly logger?: Logger;
  /** Freezes what sits on member devices around take (src/freeze); none by default. */
  readonly freezer?: Freezer;
  /** Refusals of backend and storage paths by place (the daemon's state and mount); none by default. */
  readonly pathPolicy?: PathPolicy;
  /** A stage in front of every difference storage's chunk I/O (fault injection in tests); none by default. */
  readonly storageStage?: (device: StorageDevice) => StorageDevice;
  /**
   * A stage over each export's device as it is published, under its checked wrapper (the daemon's I/O
   * counters, src/metrics/); none by default.
   */
  readonly exportStage?: (device: BlockDevice, identity: ExportStageIdentity) => BlockDevice;
  /** Told of each successful take and each snapshot event (the daemon's metrics); none by default. */
  readonly observer?: EngineObserver;
  /**
   * Keeps snapshots across restarts (the daemon's snapshot keeper). Without it (library use) snapshots
   * live as long as the engine, a directory storage is an anonymous temporary file, and close() destroys.
   */
  readonly persistence?: SnapshotPersistence;
}

export interface EngineObserver {
  snapshotTaken?(info: SnapshotInfo): void;
  snapshotEvent?(snapshotId: string, event: SnapshotEvent): void;
}

/** The export an exportStage is asked for: its name, its device, and the snapshot of an image. */
export interface ExportStageIdentity {
  readonly exportName: string;
  readonly device: string;
  readonly snapshot: string | null;
}

/** DeviceAddOptions plus, for library users, a ready BlockDevice instead of a path. */
export interface DeviceAddLibraryOptions extends DeviceAddOptions {
  readonly backend?: BlockDevice & { close?(): Promise<void> };
}

interface DeviceEntry {
  readonly name: string;
  readonly backendPath: string;
  readonly backend: BlockDevice & { close?(): Promise<void> };
  readonly tracker: Tracker;
  readonly export: Export;
  /** Owner of the backend's claim (backend-claims.ts). */
  readonly claimOwner: object;
  snapshotId: string | null;
}

export class Engine implements ExportSource {
  private readonly logger: Logger;
  private readonly freezer: Freezer | null;
  private readonly storageStage: EngineOptions["storageStage"];
  private readonly exportStage: EngineOptions["exportStage"];
  private readonly observer: EngineObserver | null;
  private readonly persistence: SnapshotPersistence | null;
  private readonly devices = new Map<string, DeviceEntry>();
  private readonly snapshots = new Map<string, Snapshot>();
  private readonly imageExports = new Map<string, Export>();
  /** Owner of each snapshot's storage claims (backend-claims.ts). */
  private readonly snapshotClaims = new Map<string, object>();
  private readonly listeners = new Set<() => void>();
  private readonly claims: BackendClaims;
  /** Names whose removal is flushing: not free for a new device until it ended. */
  private readonly removing = new Set<string>();
  /** Per device, the CBT generation and take number of the last take made by this engine. */
  private readonly lastTakes = new Map<
    string,
    { readonly generationId: string; readonly changesNumber: number }
  >();
  private closed = false;

  constructor(options: EngineOptions = {}) {
    this.logger = options.logger ?? silentLogger;
    this.freezer = options.freezer ?? null;
    this.persistence = options.persistence ?? null;
    this.storageStage = options.storageStage;
    this.exportStage = options.exportStage;
    this.observer = options.observer ?? null;
    this.claims = new BackendClaims(options.pathPolicy ?? null);
  }

  // ---- devices ----

  async addDevice(options: DeviceAddLibraryOptions): Promise<DeviceInfo> {
    this.checkOpen();
    checkDeviceName(options.name);
    if (this.devices.has(options.name))
      throw new BlockError("EEXIST", `Device ${options.name} already exists`);
    if (this.devices.size >= devicesMax) throw new BlockError("ENOSPC", `At most ${devicesMax} devices`);
    checkDeviceAddOptions(options);
    const admission =
      options.backend === undefined && options.backendPath !== memoryBackendPath
        ? await this.claims.admit(options.backendPath, "backend")
        : null;
    this.checkAddable(options.name);
    const backend = options.backend ?? this.openBackend(options.backendPath, options.sizeBytes);
    const claimOwner = {};
    let tracker: Tracker;
    try {
      if (admission !== null) {
        await this.claims.confirm(
          admission,
          openedDescriptor(backend),
          claimOwner,
          `the backend of device ${options.name}`,
        );
      }
      if (backend.sizeBytes <= 0) {
        throw new BlockError(
          "EINVAL",
          `Backend ${JSON.stringify(options.backendPath)} is empty: give --size`,
        );
      }
      // The CBT map is allocated inside the try: if it fails, the backend opened above is closed.
      const cbt =
        options.cbtState === undefined
          ? new CbtMap(backend.sizeBytes, options.cbtBlockSizeBytes, options.cbtGenerationReason)
          : CbtMap.fromState(options.cbtState, backend.sizeBytes, options.cbtBlockSizeBytes);
      tracker = new Tracker(options.name, backend, cbt, options.writeIntent ?? null);
      this.checkAddable(options.name);
    } catch (error) {
      this.claims.release(claimOwner);
      await backend.close?.();
      throw error;
    }
    const entry: DeviceEntry = {
      name: options.name,
      backendPath: options.backendPath,
      backend,
      tracker,
      claimOwner,
      snapshotId: null,
      export: {
        name: options.name,
        description: `origin device ${options.name} (${options.backendPath})`,
        device: new CheckedDevice(this.staged(tracker, options.name, options.name, null)),
        readOnly: !backend.capabilities.canWrite,
      },
    };
    assert(
      !this.devices.has(options.name) && !this.removing.has(options.name),
      "the name was checked free after the last await",
    );
    this.devices.set(options.name, entry);
    this.logger.info({ device: options.name, backendPath: options.backendPath }, "device added");
    this.notify();
    return this.describeDevice(entry);
  }

  /**
   * All or nothing: the export goes away, the backend is flushed, then closed. When the final flush fails
   * the device comes back as it was (still serving, same CBT) and the remove can be retried; the name stays
   * reserved meanwhile, so no add can take it.
   */
  async removeDevice(name: string): Promise<void> {
    const entry = this.device(name);
    if (entry.snapshotId !== null) {
      throw new BlockError("EBUSY", `Device ${name} is in snapshot ${entry.snapshotId}: destroy it first`);
    }
    const order = [...this.devices.keys()];
    this.devices.delete(name);
    this.removing.add(name);
    this.notify();
    try {
      try {
        await entry.backend.flush();
      } catch (error) {
        if (!this.closed) {
          // Back in its place: listings keep the order in which devices were added.
          const current = new Map(this.devices);
          current.set(name, entry);
          this.devices.clear();
          for (const key of [...order, ...current.keys()]) {
            const device = current.get(key);
            if (device !== undefined && !this.devices.has(key)) this.devices.set(key, device);
          }
          this.notify();
        }
        const cause = toBlockError(error, "flush");
        throw new BlockError(
          cause.errno,
          `Device ${name} was not removed: its final flush failed (${cause.message})`,
          {
            cause: error,
          },
        );
      }
      await entry.backend.close?.();
      this.claims.release(entry.claimOwner);
    } finally {
      this.removing.delete(name);
    }
    this.lastTakes.delete(name);
    this.logger.info({ device: name }, "device removed");
  }

  listDevices(): DeviceInfo[] {
    return [...this.devices.values()].map((entry) => this.describeDevice(entry));
  }

  deviceInfo(name: string): DeviceInfo {
    return this.describeDevice(this.device(name));
  }

  // ---- CBT ----

  cbtInfo(name: string): CbtInfo {
    return this.device(name).tracker.cbt.info();
  }

  /** The whole CBT state of a device, for saving at a clean stop. */
  cbtState(name: string): CbtState {
    return this.device(name).tracker.cbt.exportState();
  }

  cbtRead(name: string): Uint8Array {
    return this.device(name).tracker.cbt.readMapCopy();
  }

  /**
   * Resolves once the marks are durable too (the device's write intent, when it has one). The ranges are
   * sorted and merged first, so overlapping or repeated ranges cost nothing extra: the work is proportional
   * to the blocks touched (at most the map), not to ranges × their lengths. It is done in slices of
   * markDirtyBlocksPerSlice blocks with a yield to the event loop between them, so a mark of a whole large
   * device does not hold the daemon. A block is marked once the call returns; a take in between puts the
   * blocks marked after it into the next epoch, where they still show as changed.
   */
  async cbtMarkDirty(name: string, ranges: readonly ByteRange[]): Promise<void> {
    const entry = this.device(name);
    for (const range of ranges) checkRange(range, entry.tracker.sizeBytes);
    const intents: Promise<void>[] = [];
    let blocksSinceYield = 0;
    for (const range of mergedRanges(ranges)) {
      let offsetBytes = range.offsetBytes;
      const endBytes = range.offsetBytes + range.lengthBytes;
      while (offsetBytes < endBytes) {
        if (blocksSinceYield >= markDirtyBlocksPerSlice) {
          await new Promise<void>((resolve) => setImmediate(resolve));
          blocksSinceYield = 0;
          if (this.devices.get(name) !== entry) {
            throw new BlockError("ENOENT", `Device ${name} was removed while its ranges were marked dirty`);
          }
        }
        const cbt = entry.tracker.cbt;
        // The device may have shrunk at a take meanwhile: blocks past its end no longer exist.
        const sliceEndBytes = Math.min(
          endBytes,
          entry.tracker.sizeBytes,
          (Math.floor(offsetBytes / cbt.blockSizeBytes) + markDirtyBlocksPerSlice) * cbt.blockSizeBytes,
        );
        if (sliceEndBytes <= offsetBytes) break;
        cbt.setBoth(offsetBytes, sliceEndBytes - offsetBytes);
        const intent =
          entry.tracker.writeIntent?.beforeWrite(offsetBytes, sliceEndBytes - offsetBytes) ?? null;
        if (intent !== null) intents.push(intent);
        blocksSinceYield += Math.ceil((sliceEndBytes - offsetBytes) / cbt.blockSizeBytes);
        offsetBytes = sliceEndBytes;
      }
    }
    await Promise.all(intents);
  }

  // ---- snapshots ----

  async createSnapshot(options: SnapshotCreateOptions): Promise<SnapshotInfo> {
    this.checkOpen();
    const { chunkSizeBytes, growthPortionBytes, onCowError, deviceNames } =
      checkSnapshotCreateOptions(options);
    if (this.snapshots.size >= snapshotsMax)
      throw new BlockError("ENOSPC", `At most ${snapshotsMax} snapshots`);
    const checkMembers = () => {
      this.checkOpen();
      const members = deviceNames.map((name) => this.device(name));
      for (const member of members) this.checkFree(member);
      return members;
    };
    checkMembers();
    const admission = await this.admitStorage(options.storage);

    const id = randomUUID();
    const kept = this.persistence !== null && options.transient !== true;
    if (options.storage === memoryStoragePath && kept)
      this.logger.warn(
        { snapshot: id },
        "a snapshot on memory: storage does not survive a restart of the daemon",
      );
    let snapshot: Snapshot | undefined;
    const storage = new DiffStorage({
      path: options.storage,
      limitBytes: options.limitBytes,
      growthPortionBytes,
      onEvent: (event) => snapshot?.pushEvent({ ...event, timeMs: Date.now() }),
      areaStage: this.storageStage,
      ...(kept ? this.storageFileNaming(id) : {}),
    });
    const claimOwner = {};
    let members: DeviceEntry[];
    try {
      if (admission !== null) {
        for (const fd of storage.fileDescriptors) {
          await this.claims.confirm(admission, fd, claimOwner, `the difference storage of snapshot ${id}`);
        }
      }
      // The checks above awaited: the members may have gone or joined a snapshot meanwhile.
      members = checkMembers();
      if (this.snapshots.size >= snapshotsMax)
        throw new BlockError("ENOSPC", `At most ${snapshotsMax} snapshots`);
    } catch (error) {
      this.claims.release(claimOwner);
      await storage.close();
      throw error;
    }
    this.snapshotClaims.set(id, claimOwner);
    snapshot = new Snapshot({
      id,
      storage,
      chunkSizeBytes,
      onCowError,
      preTakeCommand: options.preTakeCommand,
      postTakeCommand: options.postTakeCommand,
      kept,
      logger: this.logger,
      onEvent: (event) => this.observer?.snapshotEvent?.(id, event),
      ...(kept ? this.persistenceHooks(id) : {}),
    });
    for (const member of members) {
      snapshot.addMember(member.tracker);
      member.snapshotId = id;
    }
    this.snapshots.set(id, snapshot);
    try {
      if (kept) await this.persistence?.save(snapshotRecord(snapshot));
    } catch (error) {
      await this.destroySnapshot(id).catch(() => {});
      throw toBlockError(error, `Cannot record snapshot ${id}`);
    }
    this.logger.info({ snapshot: id, devices: deviceNames, storage: options.storage }, "snapshot created");
    return snapshot.info();
  }

  /**
   * Brings back a snapshot kept by the snapshot keeper (daemon start, after the devices): its storage
   * opened again, its members (which must exist, be free and have kept their size), and for a taken one
   * the chunk map from its records and the images under their old names. Untrusted records (a host crash
   * before they were durable) give a corrupted snapshot: never an image with wrong bytes.
   */
  async restoreSnapshot(restore: SnapshotRestore): Promise<SnapshotInfo> {
    this.checkOpen();
    const { record } = restore;
    if (this.snapshots.has(record.id)) throw new BlockError("EEXIST", `Snapshot ${record.id} already exists`);
    if (record.members.length !== restore.chunks.length || record.members.length !== record.corrupted.length)
      throw new BlockError("EINVAL", `The records of snapshot ${record.id} do not agree on its members`);
    const members = record.members.map(({ name, sizeBytes }) => {
      const entry = this.device(name);
      this.checkFree(entry);
      if (entry.tracker.sizeBytes !== sizeBytes)
        throw new BlockError("EINVAL", `Device ${name} changed size since snapshot ${record.id} was taken`);
      return entry;
    });
    const filledBytes = record.storageAreas.map(() => 0);
    for (const [memberIndex, entries] of restore.chunks.entries()) {
      const sizeBytes = record.members[memberIndex]?.sizeBytes ?? 0;
      for (const [chunkIndex, code] of entries) {
        const { areaIndex, offsetBytes } = decodeLocationCode(code);
        const lengthBytes = Math.min(record.chunkSizeBytes, sizeBytes - chunkIndex * record.chunkSizeBytes);
        if (areaIndex >= filledBytes.length || lengthBytes <= 0)
          throw new BlockError("EINVAL", `A chunk record of snapshot ${record.id} is outside its storage`);
        filledBytes[areaIndex] = Math.max(filledBytes[areaIndex] ?? 0, offsetBytes + lengthBytes);
      }
    }
    let snapshot: Snapshot | undefined;
    const storage = DiffStorage.reopen(
      {
        limitBytes: record.limitBytes,
        growthPortionBytes: record.growthPortionBytes,
        onEvent: (event) => snapshot?.pushEvent({ ...event, timeMs: Date.now() }),
        areaStage: this.storageStage,
        ...this.storageFileNaming(record.id),
      },
      record.storageAreas.map((area, index) => ({ record: area, filledBytes: filledBytes[index] ?? 0 })),
    );
    const claimOwner = {};
    try {
      for (const [index, area] of record.storageAreas.entries()) {
        const admission = await this.admitStorage(area.path);
        const fd = storage.fileDescriptors[index];
        if (admission !== null && fd !== undefined)
          await this.claims.confirm(
            admission,
            fd,
            claimOwner,
            `the difference storage of snapshot ${record.id}`,
          );
      }
      for (const entry of members) this.checkFree(entry);
    } catch (error) {
      this.claims.release(claimOwner);
      await storage.close();
      throw error;
    }
    this.snapshotClaims.set(record.id, claimOwner);
    snapshot = new Snapshot({
      id: record.id,
      storage,
      chunkSizeBytes: record.chunkSizeBytes,
      onCowError: record.onCowError,
      preTakeCommand: record.preTakeCommand ?? undefined,
      postTakeCommand: record.postTakeCommand ?? undefined,
      createdAtMs: record.createdAtMs,
      kept: true,
      logger: this.logger,
      onEvent: (event) => this.observer?.snapshotEvent?.(record.id, event),
      ...this.persistenceHooks(record.id),
    });
    for (const entry of members) {
      snapshot.addMember(entry.tracker);
      entry.snapshotId = record.id;
    }
    this.snapshots.set(record.id, snapshot);
    if (record.takenAtMs !== null) {
      await snapshot.restoreTaken({
        takenAtMs: record.takenAtMs,
        takeStallMs: record.takeStallMs,
        chunks: restore.chunks,
        corrupted: record.corrupted.map(
          (errno) => errno ?? (restore.untrustedReason === null ? null : "EIO"),
        ),
      });
      this.publishImages(snapshot);
      if (restore.untrustedReason !== null) await this.persistence?.save(snapshotRecord(snapshot));
    }
    this.logger.info({ snapshot: record.id, state: snapshot.state }, "snapshot restored");
    this.notify();
    return snapshot.info();
  }

  /** Named storage files in directories, for snapshots that are kept across restarts. */
  private storageFileNaming(id: string): { areaFileName?: (areaIndex: number) => string } {
    if (!this.persistence) return {};
    return { areaFileName: (areaIndex) => `blocksnap-${id}-${areaIndex}.diff` };
  }

  private persistenceHooks(id: string): {
    onStored?: SnapshotOptionsHooks["onStored"];
    onCorrupted?: () => void;
  } {
    const persistence = this.persistence;
    if (!persistence) return {};
    return {
      onStored: (memberIndex, chunkIndex, locationCode) =>
        persistence.chunkStored(id, memberIndex, chunkIndex, locationCode),
      onCorrupted: () => {
        const snapshot = this.snapshots.get(id);
        if (!snapshot) return;
        persistence.save(snapshotRecord(snapshot)).catch((error: unknown) => {
          this.logger.error({ snapshot: id, err: error }, "cannot record the corruption of a snapshot");
        });
      },
    };
  }

  addDeviceToSnapshot(id: string, deviceName: string): void {
    const snapshot = this.snapshot(id);
    const entry = this.device(deviceName);
    if (entry.snapshotId === id)
      throw new BlockError("EALREADY", `Device ${deviceName} is already in snapshot ${id}`);
    this.checkFree(entry);
    if (snapshot.isTaken || snapshot.state === "destroyed") {
      throw new BlockError("EPERM", `Cannot add ${deviceName} to snapshot ${id}: it was already taken`);
    }
    snapshot.addMember(entry.tracker);
    entry.snapshotId = id;
  }

  async appendStorage(id: string, options: AppendStorageOptions): Promise<StorageInfo> {
    const snapshot = this.snapshot(id);
    if (snapshot.state === "destroyed") throw new BlockError("ESRCH", `Snapshot ${id} was destroyed`);
    if (
      options.sizeBytes !== undefined &&
      (!Number.isSafeInteger(options.sizeBytes) || options.sizeBytes <= 0)
    ) {
      throw new BlockError("EINVAL", `Invalid storage size ${options.sizeBytes}`);
    }
    const admission = await this.admitStorage(options.storage);
    const area = snapshot.storage.openArea(options.storage, options.sizeBytes);
    const claimOwner = this.snapshotClaims.get(id);
    try {
      if (admission !== null && claimOwner !== undefined) {
        await this.claims.confirm(
          admission,
          openedDescriptor(area.device),
          claimOwner,
          `the difference storage of snapshot ${id}`,
        );
      }
      if (this.snapshots.get(id) !== snapshot) throw new BlockError("ESRCH", `Snapshot ${id} was destroyed`);
      snapshot.storage.appendArea(area);
    } catch (error) {
      await area.close();
      throw error;
    }
    if (snapshot.kept) await this.persistence?.save(snapshotRecord(snapshot));
    return snapshot.storage.info();
  }

  async takeSnapshot(id: string, options: TakeOptions = {}): Promise<SnapshotInfo> {
    const snapshot = this.snapshot(id);
    const freezeTimeoutMs = checkTakeOptions(options);
    await snapshot.take({ freezer: options.noFreeze ? null : this.freezer, freezeTimeoutMs });
    // A destroy may have been queued behind this take: publish no image of a snapshot that is gone.
    if (this.snapshots.get(id) !== snapshot) throw new BlockError("ESRCH", `Snapshot ${id} was destroyed`);
    this.publishImages(snapshot);
    // The reply says "taken" only once the record says so (a crash before keeps it as created).
    if (snapshot.kept) await this.persistence?.save(snapshotRecord(snapshot));
    const info = snapshot.info();
    this.observer?.snapshotTaken?.(info);
    this.logger.info({ snapshot: id, takeStallMs: info.takeStallMs }, "snapshot taken");
    this.notify();
    return info;
  }

  /** Publishes the image exports of a taken snapshot under `<device>@<id>`. */
  private publishImages(snapshot: Snapshot): void {
    const id = snapshot.id;
    for (const name of snapshot.memberNames) {
      const member = snapshot.member(name);
      if (!member?.image) continue;
      const exportName = imageExportName(name, id);
      assert(!this.imageExports.has(exportName), "a snapshot publishes its images once");
      const changedBlocks = imageChangedBlocks(snapshot, member.tracker.cbt, this.lastTakes.get(name));
      this.lastTakes.set(name, {
        generationId: changedBlocks.generationId,
        changesNumber: changedBlocks.changesNumber,
      });
      // A snapshot kept across a restart whose device's CBT had to start a new generation (a host crash,
      // a backend changed meanwhile) has no take in it: its image offers no changed-blocks context.
      const sinceTake = changedBlocks.changesNumber >= 1;
      this.imageExports.set(exportName, {
        name: exportName,
        description: sinceTake
          ? `snapshot image of ${name}, snapshot ${id}, ` +
            `CBT generation ${changedBlocks.generationId} take ${changedBlocks.changesNumber}`
          : `snapshot image of ${name}, snapshot ${id} (its CBT generation was not kept)`,
        device: new CheckedDevice(this.staged(member.image, exportName, name, id)),
        readOnly: false,
        ...(sinceTake ? { changedBlocks } : {}),
      });
    }
  }

  snapshotInfo(id: string): SnapshotInfo {
    return this.snapshot(id).info();
  }

  listSnapshots(): SnapshotInfo[] {
    return [...this.snapshots.values()].map((snapshot) => snapshot.info());
  }

  /** blksnap's WAIT_EVENT: the next event no other cursor-less caller got, or null after `timeoutMs`. */
  async waitEvent(id: string, timeoutMs: number): Promise<SnapshotEvent | null> {
    return (await this.readEvent(id, null, timeoutMs)).event;
  }

  /**
   * The first event after cursor `since` (the last seq the caller saw, 0 for the oldest kept; null: the
   * shared blksnap-style cursor), waiting up to `timeoutMs`; with its seq and how many the bound dropped.
   */
  readEvent(id: string, since: number | null, timeoutMs: number): Promise<EventRead> {
    const snapshot = this.snapshot(id);
    checkWaitTimeout(timeoutMs);
    return snapshot.events.wait(since, timeoutMs);
  }

  async destroySnapshot(id: string): Promise<void> {
    const snapshot = this.snapshot(id);
    this.snapshots.delete(id);
    for (const name of snapshot.memberNames) this.imageExports.delete(imageExportName(name, id));
    this.notify();
    try {
      await snapshot.destroy();
    } finally {
      this.releaseSnapshot(snapshot);
    }
    if (snapshot.kept) await this.persistence?.forget(id);
    this.logger.info({ snapshot: id }, "snapshot destroyed");
  }

  // ---- exports (ExportSource) ----

  listExports(): readonly Export[] {
    return [...[...this.devices.values()].map((entry) => entry.export), ...this.imageExports.values()];
  }

  findExport(name: string): Export | undefined {
    return this.devices.get(name)?.export ?? this.imageExports.get(name);
  }

  onExportsChanged(listener: () => void): () => void {
    this.listeners.add(listener);
    return () => this.listeners.delete(listener);
  }

  /** The tracker of a device (library users and tests; faces use exports). */
  tracker(name: string): Tracker {
    return this.device(name).tracker;
  }

  /** Destroys every snapshot, then flushes and closes every backend. */
  /**
   * Destroys every snapshot and closes every backend, flushing it first unless `flush` is false (a
   * hand-over to a successor process: it opens the same files and shares their page cache, and what a
   * client flushed is already durable).
   */
  async close(options: { readonly flush?: boolean } = {}): Promise<void> {
    if (this.closed) return;
    this.closed = true;
    for (const [id, snapshot] of [...this.snapshots.entries()]) {
      if (snapshot.kept) await this.closeSnapshot(id);
      else await this.destroySnapshot(id);
    }
    for (const entry of [...this.devices.values()]) {
      this.devices.delete(entry.name);
      try {
        if (options.flush !== false) await entry.backend.flush();
      } catch (error) {
        this.logger.error({ device: entry.name, err: error }, "flush at close failed");
      }
      await entry.backend.close?.();
      this.claims.release(entry.claimOwner);
    }
    this.notify();
  }

  /** A stop that keeps the snapshot: detached, storage flushed and closed, files kept, the keeper told. */
  private async closeSnapshot(id: string): Promise<void> {
    const snapshot = this.snapshot(id);
    this.snapshots.delete(id);
    for (const name of snapshot.memberNames) this.imageExports.delete(imageExportName(name, id));
    try {
      await snapshot.close();
      await this.persistence?.closed(id);
    } catch (error) {
      this.logger.error({ snapshot: id, err: error }, "closing a kept snapshot failed");
    } finally {
      this.releaseSnapshot(snapshot);
    }
  }

  /** What a snapshot held in the engine once it ends here: its storage claims and its members. */
  private releaseSnapshot(snapshot: Snapshot): void {
    const id = snapshot.id;
    const claimOwner = this.snapshotClaims.get(id);
    if (claimOwner !== undefined) this.claims.release(claimOwner);
    this.snapshotClaims.delete(id);
    for (const name of snapshot.memberNames) {
      const entry = this.devices.get(name);
      if (entry?.snapshotId === id) entry.snapshotId = null;
    }
  }

  // ---- helpers ----

  private openBackend(
    backendPath: string,
    sizeBytes: number | undefined,
  ): BlockDevice & { close?(): Promise<void> } {
    if (backendPath === memoryBackendPath) {
      if (sizeBytes === undefined) throw new BlockError("EINVAL", "A memory: device needs a size");
      this.checkMemoryDeviceFits(sizeBytes);
      return new MemoryBackend(sizeBytes);
    }
    return FileBackend.open(backendPath, sizeBytes === undefined ? {} : { sizeBytes });
  }

  /** ENOMEM when the `memory:` devices with this one would exceed their share of the host's RAM. */
  private checkMemoryDeviceFits(sizeBytes: number): void {
    const ramBytes = totalmem();
    const allowedBytes = Math.floor(ramBytes * memoryDevicesRamShare);
    let takenBytes = 0;
    for (const entry of this.devices.values()) {
      if (entry.backendPath === memoryBackendPath) takenBytes += entry.backend.sizeBytes;
    }
    if (takenBytes + sizeBytes <= allowedBytes) return;
    throw new BlockError(
      "ENOMEM",
      `A memory: device of ${sizeBytes} bytes does not fit: memory: devices may take at most half of this host's RAM (${allowedBytes} of ${ramBytes} bytes), and ${takenBytes} are taken by other memory: devices`,
    );
  }

  /** `device` under the export stage, if there is one. */
  private staged(device: BlockDevice, exportName: string, deviceName: string, snapshot: string | null) {
    return this.exportStage?.(device, { exportName, device: deviceName, snapshot }) ?? device;
  }

  private device(name: string): DeviceEntry {
    const entry = typeof name === "string" ? this.devices.get(name) : undefined;
    if (!entry) throw new BlockError("ENOENT", `No device named ${JSON.stringify(name)}`);
    return entry;
  }

  private snapshot(id: string): Snapshot {
    const snapshot = typeof id === "string" ? this.snapshots.get(id) : undefined;
    if (!snapshot) throw new BlockError("ESRCH", `No snapshot with id ${JSON.stringify(id)}`);
    return snapshot;
  }

  private checkFree(entry: DeviceEntry): void {
    if (entry.snapshotId !== null) {
      throw new BlockError("EBUSY", `Device ${entry.name} is already in snapshot ${entry.snapshotId}`);
    }
  }

  /** Checks a storage path before it is opened; null for RAM. */
  private async admitStorage(storagePath: string): Promise<Admission | null> {
    if (storagePath === memoryStoragePath) return null;
    return this.claims.admit(storagePath, "storage");
  }

  /** The checks of addDevice that must hold again after each of its awaits. */
  private checkAddable(name: string): void {
    this.checkOpen();
    if (this.devices.has(name)) throw new BlockError("EEXIST", `Device ${name} already exists`);
    if (this.removing.has(name)) throw new BlockError("EBUSY", `Device ${name} is being removed`);
    if (this.devices.size >= devicesMax) throw new BlockError("ENOSPC", `At most ${devicesMax} devices`);
  }

  private describeDevice(entry: DeviceEntry): DeviceInfo {
    return {
      name: entry.name,
      backendPath: entry.backendPath,
      sizeBytes: entry.tracker.sizeBytes,
      snapshotId: entry.snapshotId,
      cbt: entry.tracker.cbt.info(),
    };
  }

  private checkOpen(): void {
    if (this.closed) throw new BlockError("ESHUTDOWN", "The engine is shutting down");
  }

  private notify(): void {
    for (const listener of this.listeners) {
      try {
        listener();
      } catch (error) {
        this.logger.error({ err: error }, "exports listener failed");
      }
    }
  }
}

/** The descriptor a file or device backend holds open (its identity is checked on it, not on a path). */
function openedDescriptor(device: BlockDevice | StorageArea["device"]): number {
  const fd = device instanceof FileBackend ? device.directReadFd() : null;
  if (fd === null) throw new BlockError("EIO", "The backend was closed while it was being added");
  return fd;
}

/**
 * The image's changed blocks, read from the device's CBT read map (frozen at take). The device is in one
 * snapshot at a time, so the map, its generation and its take number stay those of this take while the
 * snapshot lives (set_both may still raise blocks, which is right to report). Once the snapshot is
 * destroyed the next take may switch the map: then the answer is EIO, like the image's.
 */
function imageChangedBlocks(
  snapshot: Snapshot,
  cbt: CbtMap,
  lastTake: { readonly generationId: string; readonly changesNumber: number } | undefined,
): ChangedBlocks {
  const { generationId, changesNumber } = cbt.info();
  const previousChangesNumber =
    lastTake?.generationId === generationId && lastTake.changesNumber < changesNumber
      ? lastTake.changesNumber
      : null;
  return {
    generationId,
    changesNumber,
    previousChangesNumber,
    changedRuns: async (sinceChangesNumber, offsetBytes, lengthBytes) => {
      if (snapshot.state === "destroyed") {
        throw new BlockError("EIO", `Snapshot ${snapshot.id} was destroyed`);
      }
      const now = cbt.info();
      if (now.generationId !== generationId || now.changesNumber !== changesNumber) {
        throw new BlockError("EIO", `The CBT of snapshot ${snapshot.id} moved on to a later take`);
      }
      return cbt.changedRunsSince(sinceChangesNumber, offsetBytes, lengthBytes);
    },
  };
}

type SnapshotOptionsHooks = Required<Pick<ConstructorParameters<typeof Snapshot>[0], "onStored">>;

/** The record the snapshot keeper writes for `snapshot` now. */
function snapshotRecord(snapshot: Snapshot): SnapshotRecord {
  const info = snapshot.info();
  return {
    id: snapshot.id,
    createdAtMs: snapshot.createdAtMs,
    chunkSizeBytes: snapshot.chunkSizeBytes,
    onCowError: snapshot.onCowError,
    limitBytes: snapshot.storage.limitBytes,
    growthPortionBytes: snapshot.storage.growthPortionBytes,
    preTakeCommand: snapshot.preTakeCommand,
    postTakeCommand: snapshot.postTakeCommand,
    storageAreas: snapshot.storage.areaRecords,
    members: info.devices.map((device) => ({ name: device.name, sizeBytes: device.sizeBytes })),
    takenAtMs: info.takenAtMs,
    takeStallMs: info.takeStallMs,
    corrupted: info.devices.map((device) => device.error),
  };
}

/** The ranges sorted by offset, overlapping and adjacent ones merged into one. */
function mergedRanges(ranges: readonly ByteRange[]): ByteRange[] {
  const sorted = [...ranges].sort((left, right) => left.offsetBytes - right.offsetBytes);
  const merged: Array<{ offsetBytes: number; lengthBytes: number }> = [];
  for (const range of sorted) {
    const last = merged[merged.length - 1];
    if (last !== undefined && range.offsetBytes <= last.offsetBytes + last.lengthBytes) {
      const endBytes = Math.max(last.offsetBytes + last.lengthBytes, range.offsetBytes + range.lengthBytes);
      last.lengthBytes = endBytes - last.offsetBytes;
    } else {
      merged.push({ offsetBytes: range.offsetBytes, lengthBytes: range.lengthBytes });
    }
  }
  return merged;
}

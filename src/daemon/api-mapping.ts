/**
 * Engine data → control API bodies (api-types.ts), one explicit copy per type. Every field of the wire is
 * named here, so renaming or retyping an engine field breaks the build in this file rather than changing
 * `/v1` behind the docs' back, and a new engine field reaches the API only when it is added here.
 * Pure functions; the routes add how to reach each export (NBD URIs, FUSE path).
 */
import type { CbtInfo } from "../cbt/cbt-map.js";
import type {
  DeviceInfo,
  FrozenMount,
  HookResult,
  SnapshotDeviceInfo,
  SnapshotEvent,
  SnapshotInfo,
  TakeReport,
} from "../engine/engine-types.js";
import type { StorageInfo } from "../storage/diff-storage.js";
import type {
  CbtInfoView,
  DeviceView,
  FrozenMountView,
  HookResultView,
  SnapshotDeviceView,
  SnapshotEventView,
  SnapshotView,
  StorageInfoView,
  TakeReportView,
  UnavailableDeviceView,
} from "./api-types.js";
import type { UnavailableDevice } from "./device-registry.js";

/** Where an export can be reached; computed by the routes from the daemon's addresses. */
export interface ExportReach {
  readonly nbdUris: readonly string[];
  readonly fusePath: string | null;
}

export function cbtInfoView(info: CbtInfo): CbtInfoView {
  return {
    blockSizeBytes: info.blockSizeBytes,
    deviceSizeBytes: info.deviceSizeBytes,
    blockCount: info.blockCount,
    generationId: info.generationId,
    changesNumber: info.changesNumber,
    generationReason: info.generationReason,
    generationStartedAt: info.generationStartedAt,
  };
}

export function storageInfoView(info: StorageInfo): StorageInfoView {
  return {
    kind: info.kind,
    paths: [...info.paths],
    usedBytes: info.usedBytes,
    capacityBytes: info.capacityBytes,
    limitBytes: info.limitBytes,
  };
}

export function deviceView(info: DeviceInfo, reach: ExportReach): DeviceView {
  return {
    name: info.name,
    backendPath: info.backendPath,
    sizeBytes: info.sizeBytes,
    snapshotId: info.snapshotId,
    cbt: cbtInfoView(info.cbt),
    nbdUris: [...reach.nbdUris],
    fusePath: reach.fusePath,
  };
}

export function unavailableDeviceView(device: UnavailableDevice): UnavailableDeviceView {
  return {
    name: device.name,
    backendPath: device.backendPath,
    error: { errno: device.error.errno, message: device.error.message },
  };
}

function frozenMountView(mount: FrozenMount): FrozenMountView {
  return {
    device: mount.device,
    mountPoint: mount.mountPoint,
    loopDevice: mount.loopDevice,
    fsType: mount.fsType,
    freezeMs: mount.freezeMs,
    frozenMs: mount.frozenMs,
    error: mount.error,
  };
}

function hookResultView(hook: HookResult | null): HookResultView | null {
  if (hook === null) return null;
  return {
    command: hook.command,
    exitCode: hook.exitCode,
    timedOut: hook.timedOut,
    durationMs: hook.durationMs,
    output: hook.output,
  };
}

function takeReportView(report: TakeReport | null): TakeReportView | null {
  if (report === null) return null;
  return {
    frozen: report.frozen.map(frozenMountView),
    preTake: hookResultView(report.preTake),
    postTake: hookResultView(report.postTake),
  };
}

function snapshotDeviceView(device: SnapshotDeviceInfo, reach: ExportReach): SnapshotDeviceView {
  return {
    name: device.name,
    imageName: device.imageName,
    sizeBytes: device.sizeBytes,
    chunksStored: device.chunksStored,
    error: device.error,
    nbdUris: [...reach.nbdUris],
    fusePath: reach.fusePath,
  };
}

/** `reachImage` is asked only for devices whose image exists (taken snapshots). */
export function snapshotView(
  info: SnapshotInfo,
  reachImage: (imageName: string) => ExportReach,
): SnapshotView {
  return {
    id: info.id,
    state: info.state,
    createdAtMs: info.createdAtMs,
    takenAtMs: info.takenAtMs,
    takeStallMs: info.takeStallMs,
    takeReport: takeReportView(info.takeReport),
    chunkSizeBytes: info.chunkSizeBytes,
    onCowError: info.onCowError,
    storage: storageInfoView(info.storage),
    devices: info.devices.map((device) =>
      snapshotDeviceView(
        device,
        device.imageName === null ? { nbdUris: [], fusePath: null } : reachImage(device.imageName),
      ),
    ),
  };
}

export function snapshotEventView(event: SnapshotEvent): SnapshotEventView {
  switch (event.type) {
    case "corrupted":
      return { type: event.type, timeMs: event.timeMs, device: event.device, errno: event.errno };
    case "no_space":
      return { type: event.type, timeMs: event.timeMs, requestedBytes: event.requestedBytes };
    case "low_space":
      return { type: event.type, timeMs: event.timeMs, freeBytes: event.freeBytes };
    case "io_error":
      return { type: event.type, timeMs: event.timeMs, errno: event.errno, message: event.message };
  }
}

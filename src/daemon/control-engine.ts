/**
 * The part of the Engine (src/engine/engine.ts) that the daemon's control API drives. The daemon codes
 * against this interface so that its routing and persistence are testable with a fake engine; the real
 * Engine satisfies it structurally. Every method fails with a BlockError carrying an errno.
 */

import type { CbtInfo, CbtState } from "../cbt/cbt-map.js";
import type {
  AppendStorageOptions,
  ByteRange,
  DeviceAddOptions,
  DeviceInfo,
  SnapshotCreateOptions,
  SnapshotInfo,
  TakeOptions,
} from "../engine/engine-types.js";
import type { EventRead } from "../engine/event-log.js";
import type { StorageInfo } from "../storage/diff-storage.js";

export interface ControlEngine {
  addDevice(options: DeviceAddOptions): Promise<DeviceInfo>;
  removeDevice(name: string): Promise<void>;
  listDevices(): DeviceInfo[];
  deviceInfo(name: string): DeviceInfo;
  cbtInfo(name: string): CbtInfo;
  cbtRead(name: string): Uint8Array;
  cbtState(name: string): CbtState;
  cbtMarkDirty(name: string, ranges: readonly ByteRange[]): Promise<void>;
  createSnapshot(options: SnapshotCreateOptions): Promise<SnapshotInfo>;
  addDeviceToSnapshot(id: string, deviceName: string): void;
  appendStorage(id: string, options: AppendStorageOptions): Promise<StorageInfo>;
  takeSnapshot(id: string, options?: TakeOptions): Promise<SnapshotInfo>;
  snapshotInfo(id: string): SnapshotInfo;
  listSnapshots(): SnapshotInfo[];
  readEvent(id: string, since: number | null, timeoutMs: number): Promise<EventRead>;
  destroySnapshot(id: string): Promise<void>;
}

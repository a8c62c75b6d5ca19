/**
 * Response bodies of the control API (docs/api.md), shared by the daemon and the CLI. Engine data passes
 * through unchanged; the daemon only adds how to reach each export (NBD URIs, FUSE path).
 */
import type {
  CbtInfo,
  DeviceInfo,
  SnapshotDeviceInfo,
  SnapshotEvent,
  SnapshotInfo,
  StorageInfo,
} from "../engine/engine-types.js";
import type { UnavailableDevice } from "./device-registry.js";

/** The longest wait-event long poll: one hour. */
export const waitEventTimeoutMsMax = 3_600_000;

export interface ApiErrorBody {
  readonly error: { readonly errno: string; readonly message: string };
}

export interface DeviceView extends DeviceInfo {
  /** The origin export `<device>` over NBD: Unix socket first, then TCP. */
  readonly nbdUris: readonly string[];
  readonly fusePath: string | null;
}

export interface SnapshotDeviceView extends SnapshotDeviceInfo {
  /** The image export `<device>@<snapshot-id>`; empty before take. */
  readonly nbdUris: readonly string[];
  readonly fusePath: string | null;
}

export interface SnapshotView extends Omit<SnapshotInfo, "devices"> {
  readonly devices: readonly SnapshotDeviceView[];
}

/** Who can connect to the daemon (`status`): the socket mode and group, and one line per face. */
export interface AccessView {
  readonly socketMode: string;
  readonly socketGroup: string | null;
  readonly whoCanConnect: readonly string[];
}

export interface StatusView {
  readonly pid: number;
  readonly version: string;
  readonly stateDir: string;
  readonly controlSocket: string;
  readonly access: AccessView;
  readonly nbd: {
    readonly socketPath: string | null;
    readonly tcp: { readonly host: string; readonly port: number } | null;
  };
  readonly fuse: { readonly mountDir: string | null };
  readonly devices: readonly DeviceView[];
  readonly devicesUnavailable: readonly UnavailableDevice[];
  readonly snapshots: readonly SnapshotView[];
}

export interface DeviceListView {
  readonly devices: readonly DeviceView[];
  readonly devicesUnavailable: readonly UnavailableDevice[];
}

export interface SnapshotListView {
  readonly snapshots: readonly SnapshotView[];
}

export interface CbtMapJsonView extends CbtInfo {
  /** The read map, one byte per CBT block, base64. */
  readonly mapBase64: string;
}

export interface EventView {
  /** null when the timeout passed without an event. */
  readonly event: SnapshotEvent | null;
}

export interface StorageView {
  readonly storage: StorageInfo;
}

export interface RemovedView {
  readonly removed: string;
}

export interface DestroyedView {
  readonly destroyed: string;
}

/**
 * The bodies of the control API (docs/api.md), shared by the daemon and the CLI: the wire format of `/v1`.
 *
 * These types are written out here, not derived from the engine's: the engine may rename a field, the API
 * only grows. api-mapping.ts copies engine data into them field by field, so a renamed engine field fails
 * the build there instead of silently renaming a JSON key. The CLI reads only these types.
 */

import type { LogLevelName } from "../util/logger.js";
import type { BackupJobEvent } from "./backup-job-events.js";

export interface ApiErrorBody {
  readonly error: { readonly errno: string; readonly message: string };
}

/** `GET /v1/devices/:name/cbt`: blksnap's CBT parameters. */
export interface CbtInfoView {
  readonly blockSizeBytes: number;
  readonly deviceSizeBytes: number;
  readonly blockCount: number;
  readonly generationId: string;
  readonly changesNumber: number;
  readonly generationReason: string;
  /** ISO 8601, UTC. */
  readonly generationStartedAt: string;
}

export interface StorageInfoView {
  readonly kind: "file" | "directory" | "block-device" | "memory" | "mixed";
  readonly paths: readonly string[];
  readonly usedBytes: number;
  readonly capacityBytes: number;
  readonly limitBytes: number;
}

export interface DeviceView {
  readonly name: string;
  readonly backendPath: string;
  readonly sizeBytes: number;
  readonly snapshotId: string | null;
  readonly cbt: CbtInfoView;
  /** The origin export `<device>` over NBD: Unix socket first, then TCP. */
  readonly nbdUris: readonly string[];
  readonly fusePath: string | null;
}

/** A registered device that could not be attached at start. */
export interface UnavailableDeviceView {
  readonly name: string;
  readonly backendPath: string;
  readonly error: { readonly errno: string; readonly message: string };
}

export interface SnapshotDeviceView {
  readonly name: string;
  /** `<device>@<snapshot-id>` once taken. */
  readonly imageName: string | null;
  readonly sizeBytes: number;
  readonly chunksStored: number;
  readonly error: string | null;
  /** The image export `<device>@<snapshot-id>`; empty before take. */
  readonly nbdUris: readonly string[];
  readonly fusePath: string | null;
}

export interface FrozenMountView {
  readonly device: string;
  readonly mountPoint: string;
  readonly loopDevice: string;
  readonly fsType: string;
  readonly freezeMs: number;
  readonly frozenMs: number;
  readonly error: string | null;
}

export interface HookResultView {
  readonly command: string;
  readonly exitCode: number | null;
  readonly timedOut: boolean;
  readonly durationMs: number;
  readonly output: string;
}

export interface TakeReportView {
  readonly frozen: readonly FrozenMountView[];
  readonly preTake: HookResultView | null;
  readonly postTake: HookResultView | null;
}

export interface SnapshotView {
  readonly id: string;
  readonly state: "created" | "taken" | "corrupted" | "destroyed";
  readonly createdAtMs: number;
  readonly takenAtMs: number | null;
  readonly takeStallMs: number | null;
  readonly takeReport: TakeReportView | null;
  readonly chunkSizeBytes: number;
  readonly onCowError: "break-snapshot" | "fail-origin-write";
  readonly storage: StorageInfoView;
  readonly devices: readonly SnapshotDeviceView[];
}

export type SnapshotEventView =
  | { readonly type: "corrupted"; readonly timeMs: number; readonly device: string; readonly errno: string }
  | { readonly type: "no_space"; readonly timeMs: number; readonly requestedBytes: number }
  | { readonly type: "low_space"; readonly timeMs: number; readonly freeBytes: number }
  | { readonly type: "io_error"; readonly timeMs: number; readonly errno: string; readonly message: string };

/** Who can connect to the daemon (`status`): the socket mode and group, and one line per face. */
export interface AccessView {
  readonly socketMode: string;
  readonly socketGroup: string | null;
  readonly whoCanConnect: readonly string[];
}

/** The NBD access rules (serve --access): GET /v1/access and POST /v1/access/reload. */
export interface AccessRulesView {
  /** null: the daemon runs without --access (every client that gets in may use every export). */
  readonly file: string | null;
  /** When the rules in force were read (ISO 8601); null without --access. */
  readonly loadedAt: string | null;
  /** In file order (the first match decides); null without --access. */
  readonly rules:
    | readonly {
        readonly identity: string;
        readonly export: string;
        readonly grant: "none" | "ro" | "rw";
        readonly line: number;
      }[]
    | null;
}

/** NBD over TLS (serve --tls*), the same on every NBD listener (Unix socket, TCP, socket activation). */
export interface TlsView {
  /** off: STARTTLS refused; on: TLS when the client asks; require: nothing but STARTTLS before TLS. */
  readonly mode: "off" | "on" | "require";
  readonly credentials: readonly ("x509" | "psk")[];
  /** X.509 client certificates are required and verified against --tls-ca. */
  readonly verifyPeer: boolean;
}

export interface SupervisorView {
  readonly pid: number;
  /** 1 for the first engine; +1 for every restart, planned or not. */
  readonly engineNumber: number;
  /** Unplanned engine deaths, oldest first. */
  readonly restarts: readonly { readonly at: string; readonly cause: string }[];
}

export interface StatusView {
  readonly pid: number;
  readonly version: string;
  readonly stateDir: string;
  readonly controlSocket: string;
  readonly access: AccessView;
  /** Present when the daemon runs under `serve --supervise`; `pid` is then the engine's. */
  readonly supervisor?: SupervisorView;
  readonly nbd: {
    readonly socketPath: string | null;
    readonly tcp: { readonly host: string; readonly port: number } | null;
    readonly tls: TlsView;
  };
  /** The access rules in force (serve --access): file and rule count; null without --access. */
  readonly accessRules: { readonly file: string; readonly rules: number; readonly loadedAt: string } | null;
  readonly fuse: { readonly mountDir: string | null };
  readonly devices: readonly DeviceView[];
  readonly devicesUnavailable: readonly UnavailableDeviceView[];
  /**
   * Per device restored at start: what its CBT came back from — `restored after a clean stop`,
   * `recovered after a daemon crash: N dirty region(s), M block(s) raised` (or a host crash), or
   * `untrusted: <why>` (a new generation).
   */
  readonly cbtRecoveries: Readonly<Record<string, string>>;
  /** Per snapshot kept across the last start: restored, corrupted (a host crash) or lost, and why. */
  readonly snapshotRecoveries: readonly SnapshotRecoveryView[];
  readonly snapshots: readonly SnapshotView[];
  /** The daemon's log level now (serve --log-level, changed by POST /v1/log-level); absent in tests. */
  readonly logLevel?: LogLevelName;
}

export interface LogLevelView {
  readonly level: LogLevelName;
  /** POST only: the level before the change. */
  readonly previous?: LogLevelName;
}

export interface SnapshotRecoveryView {
  readonly id: string;
  readonly outcome: "restored" | "corrupted" | "lost";
  readonly reason: string;
  readonly chunks: number;
}

export interface DeviceListView {
  readonly devices: readonly DeviceView[];
  readonly devicesUnavailable: readonly UnavailableDeviceView[];
}

export interface SnapshotListView {
  readonly snapshots: readonly SnapshotView[];
}

export interface CbtMapJsonView extends CbtInfoView {
  /** The read map, one byte per CBT block, base64. */
  readonly mapBase64: string;
}

/** An event with its place in the snapshot's event log (1, 2, …). */
export type SequencedEventView = SnapshotEventView & { readonly seq: number };

export interface EventView {
  /** null when the timeout passed without an event. */
  readonly event: SequencedEventView | null;
  /** The cursor to pass as `since` next: the event's seq, or the cursor given when there was none. */
  readonly nextSince: number;
  /** Events after the cursor, before this one, that the log's bound dropped before they were read. */
  readonly missed: number;
}

export interface StorageView {
  readonly storage: StorageInfoView;
}

export interface RemovedView {
  readonly removed: string;
}

export interface DestroyedView {
  readonly destroyed: string;
}

/** `GET /v1/backups/events`: the first job event after the cursor, as a snapshot's event reads are. */
export interface BackupJobEventsView {
  readonly event: (BackupJobEvent & { readonly seq: number }) | null;
  readonly nextSince: number;
  readonly missed: number;
}

/**
 * Public types of the Engine (the library API). Everything here is plain data that can be sent as JSON by
 * the daemon's control API unchanged: sizes and offsets in bytes, ids as strings, times in milliseconds.
 */

import type { Errno } from "../block/errors.js";
import type { WriteIntent } from "../block/write-intent.js";
import type { CbtInfo, CbtState } from "../cbt/cbt-map.js";
import type { OnCowError } from "../cow/diff-area.js";
import type { StorageInfo } from "../storage/diff-storage.js";
import type { StorageAreaRecord } from "../storage/storage-area.js";

export type SnapshotState = "created" | "taken" | "corrupted" | "destroyed";

export interface DeviceAddOptions {
  /** `[A-Za-z0-9._-]{1,64}` */
  readonly name: string;
  /** A regular file or a block device. With `sizeBytes` and an absent file, the file is created. */
  readonly backendPath: string;
  readonly sizeBytes?: number;
  /** Override of the CBT block size rule (power of two, 4 KiB .. 64 MiB). */
  readonly cbtBlockSizeBytes?: number;
  /** The CBT state saved at the last clean stop, checked by the caller; CbtMap.fromState checks the rest. */
  readonly cbtState?: CbtState;
  /** Why a new generation starts when there is no state to restore (default `attached`). */
  readonly cbtGenerationReason?: string;
  /** Told of every modification before it reaches the backend (the daemon's CBT journal). */
  readonly writeIntent?: WriteIntent;
}

export interface DeviceInfo {
  readonly name: string;
  readonly backendPath: string;
  readonly sizeBytes: number;
  /** The snapshot this device belongs to, if any. */
  readonly snapshotId: string | null;
  readonly cbt: CbtInfo;
}

export interface ByteRange {
  readonly offsetBytes: number;
  readonly lengthBytes: number;
}

export interface SnapshotCreateOptions {
  /** A regular file, a directory (anonymous temp file), a block device, or `memory:`. */
  readonly storage: string;
  readonly limitBytes: number;
  readonly devices?: readonly string[];
  /** Power of two, 4 KiB .. 64 MiB; default 256 KiB. */
  readonly chunkSizeBytes?: number;
  readonly onCowError?: OnCowError;
  /** Storage growth step; default 64 MiB. */
  readonly growthPortionBytes?: number;
  /** Shell command run before the file systems are frozen at take (environment: see docs). */
  readonly preTakeCommand?: string;
  /** Shell command run after they are thawed, also when the take failed. */
  readonly postTakeCommand?: string;
  /**
   * Not kept across a restart of the daemon (a backup job's own snapshot): no records, a directory gets
   * an anonymous temporary file, and a stop destroys it. Default false.
   */
  readonly transient?: boolean;
}

export interface TakeOptions {
  /** Skip freezing file systems and running hooks (default false). */
  readonly noFreeze?: boolean;
  /** Upper bound for each freeze, thaw and hook, in milliseconds; default 30000. */
  readonly freezeTimeoutMs?: number;
}

export interface FrozenMount {
  readonly device: string;
  readonly mountPoint: string;
  readonly loopDevice: string;
  readonly fsType: string;
  /** How long the freeze call took (it syncs the file system; new writers already wait), in milliseconds. */
  readonly freezeMs: number;
  /** From the freeze returning to the thaw returning, in milliseconds. */
  readonly frozenMs: number;
  readonly error: string | null;
}

export interface HookResult {
  readonly command: string;
  readonly exitCode: number | null;
  readonly timedOut: boolean;
  readonly durationMs: number;
  readonly output: string;
}

export interface TakeReport {
  readonly frozen: readonly FrozenMount[];
  readonly preTake: HookResult | null;
  readonly postTake: HookResult | null;
}

export interface AppendStorageOptions {
  /** A regular file, a directory (new temp file), a block device, or `memory:`. */
  readonly storage: string;
  /** Size for a file to create or extend, a temp file or memory; a block device is used whole. */
  readonly sizeBytes?: number;
}

export type SnapshotEvent =
  | { readonly type: "corrupted"; readonly timeMs: number; readonly device: string; readonly errno: Errno }
  | { readonly type: "no_space"; readonly timeMs: number; readonly requestedBytes: number }
  | { readonly type: "low_space"; readonly timeMs: number; readonly freeBytes: number }
  /** A write or growth of the difference storage failed with this errno (once per errno until a write succeeds). */
  | { readonly type: "io_error"; readonly timeMs: number; readonly errno: Errno; readonly message: string };

export interface SnapshotDeviceInfo {
  readonly name: string;
  /** Export name of the image `<device>@<snapshot-id>`, present once taken. */
  readonly imageName: string | null;
  readonly sizeBytes: number;
  /** Chunks preserved or written through the image. */
  readonly chunksStored: number;
  /** Chunks copied before an origin write (a part of chunksStored), and their bytes. */
  readonly chunksCopied: number;
  readonly copiedBytes: number;
  /** errno of the corruption of this device's diff area, or null. */
  readonly error: Errno | null;
}

export interface SnapshotInfo {
  readonly id: string;
  readonly state: SnapshotState;
  readonly createdAtMs: number;
  readonly takenAtMs: number | null;
  /** How long new origin writes were held at take (drain + switch), in milliseconds. */
  readonly takeStallMs: number | null;
  /** What was frozen around the take and what the hooks did; null before take or with --no-freeze. */
  readonly takeReport: TakeReport | null;
  readonly chunkSizeBytes: number;
  readonly onCowError: OnCowError;
  readonly storage: StorageInfo;
  readonly devices: readonly SnapshotDeviceInfo[];
}

/**
 * What the daemon keeps of a snapshot to bring it back after a restart (the snapshot keeper writes it at
 * create, append-storage, take and corruption). Plain data; the chunk map is kept apart, a record per
 * stored chunk (SnapshotPersistence.chunkStored).
 */
export interface SnapshotRecord {
  readonly id: string;
  readonly createdAtMs: number;
  readonly chunkSizeBytes: number;
  readonly onCowError: OnCowError;
  readonly limitBytes: number;
  readonly growthPortionBytes: number;
  readonly preTakeCommand: string | null;
  readonly postTakeCommand: string | null;
  readonly storageAreas: readonly StorageAreaRecord[];
  /** Members in member order (chunk records name a member by its place here), with their sizes. */
  readonly members: ReadonlyArray<{ readonly name: string; readonly sizeBytes: number }>;
  readonly takenAtMs: number | null;
  readonly takeStallMs: number | null;
  /** Per member, in member order: the errno it was corrupted with, or null. */
  readonly corrupted: ReadonlyArray<Errno | null>;
}

/** The engine's seam to the snapshot keeper (src/daemon/snapshot-keeper.ts). */
export interface SnapshotPersistence {
  /** The record changed; resolves once it is written. */
  save(record: SnapshotRecord): Promise<void>;
  /** A chunk was stored; resolves once its record is written (before the origin write goes on). */
  chunkStored(
    snapshotId: string,
    memberIndex: number,
    chunkIndex: number,
    locationCode: number,
  ): Promise<void>;
  /** The snapshot was destroyed: its records go. */
  forget(snapshotId: string): Promise<void>;
  /** The engine closed the snapshot and flushed its storage (a stop that keeps it). */
  closed(snapshotId: string): Promise<void>;
}

/** What restoreSnapshot needs besides the record: the chunk map read back from the chunk records. */
export interface SnapshotRestore {
  readonly record: SnapshotRecord;
  /** Per member, in member order: chunk index and location code of every stored chunk. */
  readonly chunks: ReadonlyArray<ReadonlyArray<readonly [number, number]>>;
  /** Set when the records cannot be trusted (a host crash before they were durable): restored corrupted. */
  readonly untrustedReason: string | null;
}

/**
 * Snapshot: a set of origin devices, one DiffStorage and one EventLog (blksnap's snapshot). Every event
 * is also logged (event-log-lines.ts).
 * Lifecycle: created -> (add devices) -> taken -> destroyed; a taken snapshot whose diff area failed
 * reports state "corrupted".
 *
 * Take is atomic across the members: every tracker stops admitting writes (hold), in-flight writes drain,
 * each tracker switches CBT and attaches its new DiffArea, then all are released. The time from the first
 * hold to the release is the stall, recorded in `takeStallMs`. Freezing file systems mounted on the
 * members happens before this, in the hooks the caller passes (docs/design/semantics.md: freeze, hold, switch,
 * release, thaw).
 *
 * Destroy: images fail with EIO at once; trackers are held, detached and released (so no origin write
 * uses the diff area afterwards); requests inside the diff areas are awaited (bounded) before the storage
 * is closed and its named files removed. Members are then free to join another snapshot. Close (a daemon
 * stop that keeps the snapshot) does the same but flushes the storage and keeps its files.
 *
 * Kept across restarts (the daemon's snapshot keeper): `onStored` records every stored chunk before the
 * origin write it protects goes on, and restoreTaken() rebuilds a taken snapshot from its records.
 */

import { performance } from "node:perf_hooks";
import { BlockError, type Errno } from "../block/errors.js";
import type { OnCowError } from "../cow/diff-area.js";
import { DiffArea } from "../cow/diff-area.js";
import { SnapshotImage } from "../cow/snapshot-image.js";
import type { Tracker } from "../cow/tracker.js";
import type { DiffStorage } from "../storage/diff-storage.js";
import { assert } from "../util/assert.js";
import { type Logger, silentLogger } from "../util/logger.js";
import type { SnapshotEvent, SnapshotInfo, SnapshotState, TakeReport } from "./engine-types.js";
import { EventLog } from "./event-log.js";
import { logSnapshotEvent } from "./event-log-lines.js";
import type { Freezer, FreezeSession } from "./freezer.js";

/** How long destroy waits for image and copy-before-write requests already inside a diff area. */
export const destroyDrainTimeoutMs = 5000;

export interface SnapshotMember {
  readonly tracker: Tracker;
  diffArea: DiffArea | null;
  image: SnapshotImage | null;
}

export interface SnapshotOptions {
  readonly id: string;
  readonly storage: DiffStorage;
  readonly chunkSizeBytes: number;
  readonly onCowError: OnCowError;
  readonly preTakeCommand?: string | undefined;
  readonly postTakeCommand?: string | undefined;
  /** Whether the snapshot keeper keeps it across restarts (default false). */
  readonly kept?: boolean;
  /** Creation time of a snapshot restored after a restart (default: now). */
  readonly createdAtMs?: number;
  /** Records a stored chunk (member's place in the snapshot, chunk, location code); see DiffArea.onStored. */
  readonly onStored?: (memberIndex: number, chunkIndex: number, locationCode: number) => Promise<void>;
  /** A member's diff area became corrupted (after its event was queued). */
  readonly onCorrupted?: () => void;
  /** Where every event is also logged (default: nowhere). */
  readonly logger?: Logger;
  /** Told of every event as it is queued (the daemon's metrics count them by type). */
  readonly onEvent?: (event: SnapshotEvent) => void;
}

/** A taken snapshot's state from its records (restoreTaken). */
export interface RestoredTake {
  readonly takenAtMs: number;
  readonly takeStallMs: number | null;
  /** Per member, in member order: the chunks recorded (chunk index, location code). */
  readonly chunks: ReadonlyArray<ReadonlyArray<readonly [number, number]>>;
  /** Per member, in member order: the errno it was corrupted with, or null. */
  readonly corrupted: ReadonlyArray<Errno | null>;
}

export interface TakeWith {
  readonly freezer: Freezer | null;
  readonly freezeTimeoutMs: number;
}

export class Snapshot {
  readonly id: string;
  readonly storage: DiffStorage;
  readonly events = new EventLog();
  readonly chunkSizeBytes: number;
  readonly onCowError: OnCowError;
  readonly createdAtMs: number;
  private readonly members = new Map<string, SnapshotMember>();
  private phase: "created" | "taking" | "taken" | "destroyed" = "created";
  private takenAtMs: number | null = null;
  private takeStallMs: number | null = null;
  private operationTail: Promise<void> = Promise.resolve();
  private takeReport: TakeReport | null = null;
  readonly preTakeCommand: string | null;
  readonly postTakeCommand: string | null;
  private readonly onStored: SnapshotOptions["onStored"];
  readonly kept: boolean;
  private readonly onCorruptedHook: (() => void) | undefined;
  private readonly logger: Logger;
  private readonly onEventHook: ((event: SnapshotEvent) => void) | undefined;

  constructor(options: SnapshotOptions) {
    this.id = options.id;
    this.createdAtMs = options.createdAtMs ?? Date.now();
    this.kept = options.kept ?? false;
    this.onStored = options.onStored;
    this.onCorruptedHook = options.onCorrupted;
    this.logger = options.logger ?? silentLogger;
    this.onEventHook = options.onEvent;
    this.storage = options.storage;
    this.chunkSizeBytes = options.chunkSizeBytes;
    this.onCowError = options.onCowError;
    this.preTakeCommand = options.preTakeCommand ?? null;
    this.postTakeCommand = options.postTakeCommand ?? null;
  }

  get state(): SnapshotState {
    if (this.phase === "destroyed") return "destroyed";
    if (this.phase === "taken") {
      for (const member of this.members.values()) if (member.diffArea?.error) return "corrupted";
      return "taken";
    }
    return "created";
  }

  get isTaken(): boolean {
    return this.phase === "taken";
  }

  get memberNames(): string[] {
    return [...this.members.keys()];
  }

  member(name: string): SnapshotMember | undefined {
    return this.members.get(name);
  }

  addMember(tracker: Tracker): void {
    if (this.phase !== "created") {
      throw new BlockError(
        "EPERM",
        `Cannot add ${tracker.name} to snapshot ${this.id}: it was already taken`,
      );
    }
    if (this.members.has(tracker.name)) {
      throw new BlockError("EALREADY", `Device ${tracker.name} is already in snapshot ${this.id}`);
    }
    this.members.set(tracker.name, { tracker, diffArea: null, image: null });
  }

  /** Take and destroy run one at a time per snapshot, in call order. */
  take(withOptions: TakeWith = { freezer: null, freezeTimeoutMs: 0 }): Promise<void> {
    return this.exclusive(() => this.takeNow(withOptions));
  }

  destroy(): Promise<void> {
    return this.exclusive(() => this.destroyNow());
  }

  private exclusive(operation: () => Promise<void>): Promise<void> {
    const result = this.operationTail.then(operation);
    this.operationTail = result.catch(() => {});
    return result;
  }

  private async takeNow(withOptions: TakeWith): Promise<void> {
    if (this.phase === "destroyed") throw new BlockError("ESRCH", `Snapshot ${this.id} was destroyed`);
    if (this.phase !== "created") throw new BlockError("EALREADY", `Snapshot ${this.id} was already taken`);
    if (this.members.size === 0) throw new BlockError("ENODEV", `Snapshot ${this.id} has no devices`);
    // Freeze first: freezing flushes dirty data through blocksnap itself, so writes must still flow.
    let session: FreezeSession | null = null;
    if (withOptions.freezer) {
      session = await withOptions.freezer.freeze({
        snapshotId: this.id,
        deviceNames: this.memberNames,
        preTakeCommand: this.preTakeCommand,
        postTakeCommand: this.postTakeCommand,
        timeoutMs: withOptions.freezeTimeoutMs,
      });
    }
    let takeError: Error | null = null;
    try {
      await this.switchAll();
    } catch (error) {
      takeError = error instanceof Error ? error : new Error(String(error));
      throw error;
    } finally {
      if (session) this.takeReport = await session.thaw(takeError);
    }
  }

  private async switchAll(): Promise<void> {
    if (this.phase !== "created") throw new BlockError("ESRCH", `Snapshot ${this.id} was destroyed`);
    if (!this.storage.canHold(this.chunkSizeBytes)) {
      throw new BlockError(
        "ENOSPC",
        `Cannot take snapshot ${this.id}: its difference storage cannot hold a single ${this.chunkSizeBytes}-byte chunk`,
      );
    }
    this.phase = "taking";
    const members = [...this.members.values()];
    for (const [memberIndex, member] of members.entries())
      member.diffArea = this.newDiffArea(member, memberIndex);
    const startMs = performance.now();
    await Promise.all(members.map((member) => member.tracker.hold()));
    for (const member of members) {
      assert(member.diffArea);
      assert(
        member.tracker.isHeld && member.tracker.inflightWriteCount === 0,
        "switch only on a drained device",
      );
      const changesBefore = member.tracker.cbt.changesNumber;
      member.tracker.cbt.switchAtTake(member.tracker.sizeBytes);
      assert(
        member.tracker.cbt.changesNumber === changesBefore + 1 || member.tracker.cbt.changesNumber === 1,
        "a take advances the changes number by one, or starts a generation at 1",
      );
      member.tracker.setDiffArea(member.diffArea);
    }
    for (const member of members) member.tracker.release();
    this.takeStallMs = roundToMicrosecondMs(performance.now() - startMs);
    this.takenAtMs = Date.now();
    // The new numbers durable before the take is reported: a backup tool must never hold a changes
    // number that a crash could take back (region-journal.ts).
    await Promise.all(
      members.map((member) => {
        const state = member.tracker.cbt.exportNumbers();
        return member.tracker.writeIntent?.afterTake(state);
      }),
    );
    for (const member of members) {
      assert(member.diffArea);
      assert(
        member.tracker.attachedDiffArea === member.diffArea,
        "every member copies into its own diff area",
      );
      member.image = new SnapshotImage(member.diffArea, member.tracker.cbt);
    }
    assert(this.phase === "taking", "nothing ends a take halfway");
    this.phase = "taken";
  }

  private newDiffArea(member: SnapshotMember, memberIndex: number): DiffArea {
    const onStored = this.onStored;
    return new DiffArea({
      deviceName: member.tracker.name,
      origin: member.tracker.backend,
      sizeBytes: member.tracker.sizeBytes,
      chunkSizeBytes: this.chunkSizeBytes,
      storage: this.storage,
      onCowError: this.onCowError,
      onCorrupted: (errno) => this.pushCorrupted(member.tracker.name, errno),
      ...(onStored
        ? {
            onStored: (chunkIndex: number, locationCode: number) =>
              onStored(memberIndex, chunkIndex, locationCode),
          }
        : {}),
    });
  }

  /**
   * A taken snapshot restored after a restart: the members' diff areas rebuilt from their records and
   * attached (under the write gate), the images made. The CBT numbers of the take are the devices' own,
   * restored by the CBT keeper. No event is queued again for a member that was already corrupted.
   */
  async restoreTaken(restored: RestoredTake): Promise<void> {
    assert(this.phase === "created", "restore into a new snapshot");
    const members = [...this.members.values()];
    assert(restored.chunks.length === members.length && restored.corrupted.length === members.length);
    for (const [memberIndex, member] of members.entries()) {
      const diffArea = this.newDiffArea(member, memberIndex);
      diffArea.restoreStored(restored.chunks[memberIndex] ?? []);
      const errno = restored.corrupted[memberIndex];
      if (errno) diffArea.restoreCorrupted(errno);
      member.diffArea = diffArea;
    }
    this.phase = "taking";
    await Promise.all(members.map((member) => member.tracker.hold()));
    for (const member of members) {
      assert(member.diffArea);
      member.tracker.setDiffArea(member.diffArea);
    }
    for (const member of members) member.tracker.release();
    for (const member of members) {
      assert(member.diffArea);
      member.image = new SnapshotImage(member.diffArea, member.tracker.cbt);
    }
    this.takenAtMs = restored.takenAtMs;
    this.takeStallMs = restored.takeStallMs === null ? null : roundToMicrosecondMs(restored.takeStallMs);
    this.phase = "taken";
  }

  /**
   * Ends this snapshot's life in this process but keeps it (a daemon stop): like destroy, but the storage
   * is flushed and its files stay for the next start.
   */
  close(): Promise<void> {
    return this.exclusive(() => this.endNow({ keepFiles: true }));
  }

  private destroyNow(): Promise<void> {
    return this.endNow({ keepFiles: false });
  }

  private async endNow(options: { readonly keepFiles: boolean }): Promise<void> {
    if (this.phase === "destroyed") return;
    const wasAttached = this.phase === "taken" || this.phase === "taking";
    this.phase = "destroyed";
    const members = [...this.members.values()];
    for (const member of members) member.diffArea?.markDestroyed();
    if (wasAttached) {
      await Promise.all(members.map((member) => member.tracker.hold()));
      for (const member of members) {
        if (member.tracker.attachedDiffArea === member.diffArea) member.tracker.setDiffArea(null);
      }
      for (const member of members) member.tracker.release();
    }
    await Promise.all(members.map((member) => member.diffArea?.waitIdle(destroyDrainTimeoutMs)));
    this.events.close();
    if (options.keepFiles) await this.storage.flush().catch(() => {});
    await this.storage.close({ removeFiles: !options.keepFiles });
  }

  info(): SnapshotInfo {
    return {
      id: this.id,
      state: this.state,
      createdAtMs: this.createdAtMs,
      takenAtMs: this.takenAtMs,
      takeStallMs: this.takeStallMs,
      takeReport: this.takeReport,
      chunkSizeBytes: this.chunkSizeBytes,
      onCowError: this.onCowError,
      storage: this.storage.info(),
      devices: [...this.members.entries()].map(([name, member]) => ({
        name,
        imageName: member.image ? `${name}@${this.id}` : null,
        sizeBytes: member.diffArea?.sizeBytes ?? member.tracker.sizeBytes,
        chunksStored: member.diffArea?.storedChunkCount ?? 0,
        chunksCopied: member.diffArea?.copyStats.chunks ?? 0,
        copiedBytes: member.diffArea?.copyStats.bytes ?? 0,
        error: member.diffArea?.error ?? null,
      })),
    };
  }

  pushEvent(event: SnapshotEvent): void {
    const seq = this.events.push(event);
    if (seq > 0) {
      logSnapshotEvent(this.logger, this.id, seq, event);
      this.onEventHook?.(event);
    }
  }

  private pushCorrupted(device: string, errno: Errno): void {
    this.pushEvent({ type: "corrupted", timeMs: Date.now(), device, errno });
    this.onCorruptedHook?.();
  }
}

/** A duration in ms to whole microseconds: the timer's noise below that is not worth a long float. */
function roundToMicrosecondMs(durationMs: number): number {
  return Math.round(durationMs * 1000) / 1000;
}

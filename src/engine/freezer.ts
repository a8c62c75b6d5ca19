/**
 * The Freezer seam of take (docs/design/semantics.md, blksnap's bdev_freeze): before the engine holds origin writes
 * it asks a Freezer to quiesce whatever sits on the member devices — file systems mounted on loop devices
 * over blocksnap's FUSE files, user hooks for what blocksnap cannot see — and after it released them it
 * thaws. The engine stays free of mounts and processes; src/freeze/ implements this interface.
 *
 * Contract: freeze() resolves (it reports problems in the records, it does not throw) once everything it
 * could freeze is frozen; the engine then holds, switches, releases, and always calls thaw(), also when
 * the take failed. thaw() never throws.
 */
import type { TakeReport } from "./engine-types.js";

export interface FreezeContext {
  readonly snapshotId: string;
  readonly deviceNames: readonly string[];
  readonly preTakeCommand: string | null;
  readonly postTakeCommand: string | null;
  /** Upper bound for each freeze, thaw and hook. */
  readonly timeoutMs: number;
}

export interface FreezeSession {
  thaw(takeError: Error | null): Promise<TakeReport>;
}

export interface Freezer {
  freeze(context: FreezeContext): Promise<FreezeSession>;
}

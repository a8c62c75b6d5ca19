/**
 * CBT after a crash: the last checkpoint (the fine map, written lazily) plus the write-intent journal
 * (region-journal.ts). Pure: no I/O, so the crash-consistency harness runs it on every crash state.
 *
 * A recovery acts like a take without a snapshot. With A the last active number the daemon used (the
 * checkpoint's or the journal header's, which every take updates durably), the recovered map has active
 * R = A + 1 and previous A; every block of every dirty region is raised to R in the write map and to A in
 * the read map. So any baseline a backup tool holds (a changes number ≤ A − 1 of this generation) sees
 * every block written since: those in the checkpoint keep their numbers, those after it are in dirty
 * regions. When a take happened after the checkpoint, the read map also takes the checkpoint's write map
 * (what that take froze). A journal of another generation than the checkpoint (a wrap or reset since)
 * starts from empty maps. Over-report: at most the dirty regions, each regionBlocks blocks.
 *
 * When the active number would pass 255, the generation is renewed instead (like a wrap): a full backup.
 */
import { type CbtState, snapNumberMax } from "../cbt/cbt-map.js";
import type { LoadedJournal } from "./region-journal.js";

export interface CbtRecovery {
  readonly state: CbtState;
  readonly regionsRaised: number;
  readonly blocksRaised: number;
}

/** null when the numbers are exhausted (the caller starts a new generation). */
export function recoverCbt(checkpoint: CbtState | null, journal: LoadedJournal): CbtRecovery | null {
  const { header } = journal;
  const blockCount = Math.ceil(header.deviceSizeBytes / header.blockSizeBytes);
  const usable =
    checkpoint !== null &&
    checkpoint.generationId === header.generationId &&
    checkpoint.blockSizeBytes === header.blockSizeBytes &&
    checkpoint.writeMap.length === blockCount;
  const writeMap = usable ? checkpoint.writeMap.slice() : new Uint8Array(blockCount);
  const readMap = usable ? checkpoint.readMap.slice() : new Uint8Array(blockCount);
  const checkpointActive = usable ? checkpoint.snapNumberActive : 1;
  const lastActive = Math.max(checkpointActive, header.snapNumberActive);
  if (usable && header.snapNumberActive > checkpoint.snapNumberActive) {
    for (let block = 0; block < blockCount; block++) {
      if (writeMap[block]! > readMap[block]!) readMap[block] = writeMap[block]!;
    }
  }
  const active = lastActive + 1;
  if (active > snapNumberMax) return null;
  const previous = lastActive;
  let regionsRaised = 0;
  let blocksRaised = 0;
  for (let region = 0; region < journal.dirty.length; region++) {
    if (journal.dirty[region] !== 1) continue;
    regionsRaised++;
    const end = Math.min(blockCount, (region + 1) * header.regionBlocks);
    for (let block = region * header.regionBlocks; block < end; block++) {
      writeMap[block] = active;
      readMap[block] = Math.max(readMap[block]!, previous);
      blocksRaised++;
    }
  }
  return {
    state: {
      generationId: header.generationId,
      generationReason: header.generationReason,
      generationStartedAtMs: header.generationStartedAtMs,
      blockSizeBytes: header.blockSizeBytes,
      deviceSizeBytes: header.deviceSizeBytes,
      snapNumberActive: active,
      snapNumberPrevious: previous,
      writeMap,
      readMap,
    },
    regionsRaised,
    blocksRaised,
  };
}

export type CrashRecovery =
  | { readonly kind: "recovered"; readonly recovery: CbtRecovery }
  | { readonly kind: "untrusted"; readonly reason: string };

/**
 * The whole decision after a crash, given the checkpoint file's state (null when absent or damaged, with
 * `checkpointProblem` saying which) and the journal. The checkpoint is needed when the journal says regions
 * were cleared against this generation's checkpoint; otherwise the maps start empty.
 */
export function recoverAfterCrash(
  checkpoint: CbtState | null,
  checkpointProblem: string | null,
  journal: LoadedJournal,
): CrashRecovery {
  const { header } = journal;
  const needsCheckpoint = header.checkpointGenerationId === header.generationId;
  if (needsCheckpoint && (checkpoint === null || checkpoint.generationId !== header.generationId)) {
    return {
      kind: "untrusted",
      reason: checkpointProblem ?? "the checkpoint this generation's journal needs is missing",
    };
  }
  const recovery = recoverCbt(needsCheckpoint ? checkpoint : null, journal);
  if (recovery === null)
    return { kind: "untrusted", reason: "recovery would pass 255 takes in this generation" };
  return { kind: "recovered", recovery };
}

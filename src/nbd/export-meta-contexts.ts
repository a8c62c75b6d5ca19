/**
 * The NBD metadata contexts of an export beyond `base:allocation`: a snapshot image's changed blocks
 * (Export.changedBlocks, protocol-neutral) named the way QEMU names dirty bitmaps, so qemu-img, nbdinfo
 * and libnbd clients read them without knowing blocksnap:
 *
 * - `qemu:dirty-bitmap:cbt`: the blocks changed since the previous take of the same CBT generation.
 *   Offered only when the server knows that take (ChangedBlocks.previousChangesNumber): absent on the
 *   first take of a generation, where there is nothing to compare with, and on the first take after a
 *   restart, where the number before this one may have been consumed by a crash recovery rather than a
 *   take. A client then selects its baseline's own context below, or copies everything.
 * - `qemu:dirty-bitmap:cbt-<generationId>-<n>`: the blocks changed since take n of generation
 *   <generationId>, for every n from 1 to the image's take number - 1. A backup tool records the generation
 *   and take number of each image it copied (both are in the export description) and next time selects
 *   exactly the context named for that baseline; when the context is absent, its baseline is gone (a new
 *   generation started, or the number is not a take before this one) and it must do a full copy.
 *
 * A dirty block has NBD_STATE_DIRTY (bit 0). The list is computed once per Export object (exports are
 * immutable), so SET and GO see the same context objects. At most 254 generation contexts (take numbers
 * stop at 255 per generation).
 */
import type { ChangedBlocks, Export } from "../block/export-source.js";
import { assert } from "../util/assert.js";
import { NBD_STATE_DIRTY } from "./nbd-protocol.js";

/** One run of a metadata context: `flags` as NBD defines them for that context. */
export interface MetaContextExtent {
  readonly lengthBytes: number;
  readonly flags: number;
}

export interface MetaContext {
  /** The full NBD context name, `namespace:leaf`, e.g. `qemu:dirty-bitmap:cbt`. */
  readonly name: string;
  /**
   * Runs covering [offsetBytes, offsetBytes + lengthBytes) from offsetBytes, in order; may cover less,
   * never more. The range is already checked against the device size. Errors are BlockErrors.
   */
  extents(offsetBytes: number, lengthBytes: number): Promise<readonly MetaContextExtent[]>;
}

export const cbtContextName = "qemu:dirty-bitmap:cbt";

/** The context of the blocks changed since take `sinceChangesNumber` of generation `generationId`. */
export function cbtSinceContextName(generationId: string, sinceChangesNumber: number): string {
  return `${cbtContextName}-${generationId}-${sinceChangesNumber}`;
}

const contextsByExport = new WeakMap<Export, readonly MetaContext[]>();

/** The export's own contexts (never `base:allocation`), unique names, the same objects on every call. */
export function exportMetaContexts(entry: Export): readonly MetaContext[] {
  const known = contextsByExport.get(entry);
  if (known) return known;
  const contexts = entry.changedBlocks ? changedBlockContexts(entry.changedBlocks) : [];
  contextsByExport.set(entry, contexts);
  return contexts;
}

function changedBlockContexts(changedBlocks: ChangedBlocks): MetaContext[] {
  const { generationId, changesNumber, previousChangesNumber } = changedBlocks;
  assert(Number.isSafeInteger(changesNumber) && changesNumber >= 1, "an image's take number is at least 1");
  assert(
    previousChangesNumber === null || (previousChangesNumber >= 1 && previousChangesNumber < changesNumber),
    "the previous take comes before this one",
  );
  const contexts: MetaContext[] = [];
  if (previousChangesNumber !== null) {
    contexts.push(sinceContext(cbtContextName, changedBlocks, previousChangesNumber));
  }
  for (let since = 1; since < changesNumber; since++) {
    contexts.push(sinceContext(cbtSinceContextName(generationId, since), changedBlocks, since));
  }
  return contexts;
}

function sinceContext(name: string, changedBlocks: ChangedBlocks, sinceChangesNumber: number): MetaContext {
  return {
    name,
    extents: async (offsetBytes, lengthBytes) => {
      const runs = await changedBlocks.changedRuns(sinceChangesNumber, offsetBytes, lengthBytes);
      return runs.map((run) => ({ lengthBytes: run.lengthBytes, flags: run.changed ? NBD_STATE_DIRTY : 0 }));
    },
  };
}

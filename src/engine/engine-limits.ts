/**
 * Every bound of the engine (the library API), named once and shaped like nbd/nbd-limits.ts: the control
 * API's schemas (daemon/api-limits.ts) and the CLI take theirs from here or assert that they stay inside,
 * so no layer accepts what a lower one refuses. Relations are asserted at module load.
 */
import { chunkSizeBytesMax, chunkSizeBytesMin } from "../cow/chunk-geometry.js";
import { growthPortionBytesDefault } from "../storage/diff-storage.js";
import { assert } from "../util/assert.js";

/** Devices one engine serves (each costs a CBT map and an export). */
export const devicesMax = 4096;
/**
 * `memory:` devices together may be at most this share of the host's RAM (os.totalmem()), counted by their
 * sizes, not by what they hold yet: a RAM disk fills as it is written, and one that cannot fit would end
 * in the OOM killer. Half leaves room for the daemon, its snapshots' storages and everything else.
 */
export const memoryDevicesRamShare = 0.5;
/** cbtMarkDirty marks at most this many CBT blocks between two yields to the event loop. */
export const markDirtyBlocksPerSlice = 1 << 20;
/** Snapshots alive at once. */
export const snapshotsMax = 1024;
/** The smallest device a `sizeBytes` may ask for: one page, the smallest block a file system uses. */
export const deviceSizeBytesMin = 4096;
/** A backend or storage path: Linux's PATH_MAX. */
export const pathCharsMax = 4096;
/** A pre-take or post-take hook command (run with `sh -c`). */
export const takeHookCommandCharsMax = 4096;
/** Each freeze, thaw and hook of a take. */
export const freezeTimeoutMsDefault = 30_000;
export const freezeTimeoutMsMax = 10 * 60_000;
/** The longest wait for a snapshot event. */
export const waitTimeoutMsMax = 24 * 60 * 60 * 1000;
/**
 * Events a snapshot's log keeps (event-log.ts); beyond it the oldest low_space event is dropped first, then
 * the oldest event, and a reader whose cursor is older is told how many it missed.
 */
export const eventsMax = 1024;

assert(devicesMax >= 1 && snapshotsMax >= 1);
assert(freezeTimeoutMsDefault > 0 && freezeTimeoutMsDefault <= freezeTimeoutMsMax);
assert(Number.isSafeInteger(waitTimeoutMsMax) && waitTimeoutMsMax <= 2 ** 31 - 1, "a setTimeout delay");
assert(growthPortionBytesDefault >= chunkSizeBytesMax, "the default growth portion holds any chunk");
assert(chunkSizeBytesMin > 0 && chunkSizeBytesMin <= chunkSizeBytesMax);

/**
 * Bounds of the control API (docs/api.md), the one place the zod schemas and the CLI take them from. Where
 * the engine has the same bound the API uses the engine's (engine/engine-limits.ts); where the API is
 * stricter (a long poll, a request's list lengths) it says so here, and module-load assertions keep every
 * API bound inside the engine's, so the API never accepts what the engine then refuses.
 */
import {
  freezeTimeoutMsMax as engineFreezeTimeoutMsMax,
  eventsMax,
  pathCharsMax,
  takeHookCommandCharsMax,
  waitTimeoutMsMax,
} from "../engine/engine-limits.js";
import { assert } from "../util/assert.js";

/** A backend or storage path in a request body. */
export const apiPathCharsMax = pathCharsMax;
/** A pre-take or post-take hook command. */
export const apiCommandCharsMax = takeHookCommandCharsMax;
/** `take --freeze-timeout`. */
export const freezeTimeoutMsMax = engineFreezeTimeoutMsMax;
/** The longest wait-event long poll: one hour (the engine allows a day; a request should not). */
export const waitEventTimeoutMsMax = 3_600_000;
/** Events a snapshot's log keeps (the engine's bound); older ones are dropped and reported as missed. */
export const eventsKeptMax = eventsMax;
/** Largest request body (413 EFBIG beyond). */
export const apiRequestBodyBytesMax = 1024 * 1024;
/**
 * Ranges in one mark-dirty request: as many as fit the body limit when every number has its 16 digits
 * (the longest compact range, below, is 65 characters; 16 000 of them are 1 040 000 bytes).
 */
export const markDirtyRangesMax = 16_000;
const markDirtyRangeJsonCharsMax = '{"offsetBytes":9007199254740991,"lengthBytes":9007199254740991},'.length;
/** Devices named in one snapshot create. */
export const snapshotDevicesMax = 256;

assert(
  markDirtyRangesMax * markDirtyRangeJsonCharsMax + '{"ranges":[]}'.length <= apiRequestBodyBytesMax,
  "a mark-dirty body of markDirtyRangesMax ranges must fit the body limit",
);
assert(waitEventTimeoutMsMax <= waitTimeoutMsMax, "a wait the engine would refuse");
assert(freezeTimeoutMsMax <= engineFreezeTimeoutMsMax && apiCommandCharsMax <= takeHookCommandCharsMax);

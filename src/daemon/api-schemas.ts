/**
 * Input validation of the control API (zod 4). Objects are strict: an unknown key is a typo the client
 * must hear about, not something to ignore. Structural checks and bounds live here; what only the engine
 * can judge (a name already taken, a chunk size that is not a power of two) is left to the engine.
 */
import { z } from "zod";
import { deviceSizeBytesMin } from "../engine/engine-limits.js";
import { deviceNameProblem } from "../engine/names.js";
import { logLevelNames } from "../util/logger.js";
import {
  apiCommandCharsMax,
  apiPathCharsMax,
  freezeTimeoutMsMax,
  markDirtyRangesMax,
  snapshotDevicesMax,
  waitEventTimeoutMsMax,
} from "./api-limits.js";

const sizeBytes = z.int().nonnegative();
// The engine's one rule (names.ts), so that the API refuses a bad name with the same reason.
const deviceName = z.string().check((context) => {
  const problem = deviceNameProblem(context.value);
  if (problem !== null)
    context.issues.push({ code: "custom", message: `invalid device name: ${problem}`, input: context.value });
});
const path = z.string().min(1).max(apiPathCharsMax);

export const deviceAddBodySchema = z.strictObject({
  name: deviceName,
  backendPath: path,
  sizeBytes: sizeBytes
    .min(deviceSizeBytesMin, { error: `size must be at least ${deviceSizeBytesMin} bytes` })
    .optional(),
  cbtBlockSizeBytes: sizeBytes.positive().optional(),
});

export const markDirtyBodySchema = z.strictObject({
  ranges: z
    .array(z.strictObject({ offsetBytes: sizeBytes, lengthBytes: sizeBytes.positive() }))
    .min(1)
    .max(markDirtyRangesMax),
});

export const snapshotCreateBodySchema = z.strictObject({
  storage: path,
  limitBytes: sizeBytes,
  devices: z.array(deviceName).max(snapshotDevicesMax).optional(),
  chunkSizeBytes: sizeBytes.positive().optional(),
  onCowError: z.enum(["break-snapshot", "fail-origin-write"]).optional(),
  growthPortionBytes: sizeBytes.positive().optional(),
  preTakeCommand: z.string().min(1).max(apiCommandCharsMax).optional(),
  postTakeCommand: z.string().min(1).max(apiCommandCharsMax).optional(),
  /** Accept a storage on a file system that lives on a member device (the take would hang). */
  force: z.boolean().optional(),
});

export const takeBodySchema = z.strictObject({
  noFreeze: z.boolean().optional(),
  freezeTimeoutMs: z.int().positive().max(freezeTimeoutMsMax).optional(),
});

export const snapshotAddDeviceBodySchema = z.strictObject({
  device: deviceName,
  force: z.boolean().optional(),
});

export const appendStorageBodySchema = z.strictObject({
  storage: path,
  sizeBytes: sizeBytes.positive().optional(),
  force: z.boolean().optional(),
});

export const waitEventQuerySchema = z.strictObject({
  timeoutMs: z.coerce.number().pipe(z.int().min(0).max(waitEventTimeoutMsMax)),
  /** The last event seq the client saw (0: from the oldest kept); absent: the shared blksnap-style cursor. */
  since: z.coerce.number().pipe(z.int().min(0).max(Number.MAX_SAFE_INTEGER)).optional(),
});

/** `GET /v1/backups/events`: the cursor (default 0: from the oldest kept) and how long to wait (default 0). */
export const backupEventsQuerySchema = z.strictObject({
  since: z.coerce.number().pipe(z.int().min(0).max(Number.MAX_SAFE_INTEGER)).optional(),
  timeoutMs: z.coerce.number().pipe(z.int().min(0).max(waitEventTimeoutMsMax)).optional(),
});

export const cbtMapQuerySchema = z.strictObject({
  format: z.enum(["binary", "base64"]).optional(),
});

/** `?force=true` (or `1`): remove a device, or destroy a snapshot, even while a file system uses it. */
export const forceQuerySchema = z.strictObject({
  force: z.enum(["true", "false", "1", "0"]).optional(),
});

export const emptyObjectSchema = z.strictObject({});

export const restartBodySchema = z.strictObject({ force: z.boolean().optional() });

const s3Settings = z
  .strictObject({
    endpoint: path.optional(),
    region: z.string().min(1).max(64).optional(),
    parallel: z.int().min(1).max(1024).optional(),
  })
  .optional();

export const backupMountBodySchema = z.strictObject({
  repository: path,
  /** DEVICE/ID, an id, or DEVICE/latest. */
  backup: z.string().min(1).max(256),
  keyFile: path.optional(),
  /** For an s3:// repository; the credentials come from the daemon's own environment, never the API. */
  s3: s3Settings,
  overlay: z.boolean().optional(),
  overlayDirectory: path.optional(),
});

/** A restore onto a device: `backup` is DEVICE/ID, an id, or DEVICE/latest. */
export const restoreBodySchema = z.strictObject({
  device: deviceName,
  repository: path,
  backup: z.string().min(1).max(200),
  keyFile: path.optional(),
  s3: s3Settings,
  force: z.boolean().optional(),
});

export const logLevelBodySchema = z.strictObject({ level: z.enum(logLevelNames) });

export const backupBodySchema = z.strictObject({
  device: deviceName,
  repository: path,
  level: z.enum(["full", "inc", "auto"]).optional(),
  keyFile: path.optional(),
  storage: path.optional(),
  limitBytes: z.int().positive().optional(),
  /** Back up from this taken snapshot (the caller's: it is not destroyed) instead of the job's own. */
  snapshotId: z.string().min(1).max(128).optional(),
  /** For an s3:// repository; the credentials come from the daemon's own environment, never the API. */
  s3: s3Settings,
});

/**
 * The on-disk form of a kept snapshot's record (`<state>/snapshots/<id>.json`): checked field by field on
 * load, since it comes from disk; anything unexpected is an EINVAL BlockError naming the field.
 */
import { z } from "zod";
import { BlockError, errnoNames } from "../block/errors.js";
import type { SnapshotRecord } from "../engine/engine-types.js";

const areaSchema = z.object({
  kind: z.enum(["file", "directory", "block-device", "memory"]),
  path: z.string().min(1),
  filePath: z.string().min(1).nullable(),
});

const recordSchema = z.object({
  id: z.string().regex(/^[0-9a-f-]{36}$/),
  createdAtMs: z.number().int().nonnegative(),
  chunkSizeBytes: z.number().int().positive(),
  onCowError: z.enum(["break-snapshot", "fail-origin-write"]),
  limitBytes: z.number().int().positive(),
  growthPortionBytes: z.number().int().positive(),
  preTakeCommand: z.string().nullable(),
  postTakeCommand: z.string().nullable(),
  storageAreas: z.array(areaSchema).min(1).max(255),
  members: z.array(z.object({ name: z.string().min(1), sizeBytes: z.number().int().positive() })).min(1),
  takenAtMs: z.number().int().nonnegative().nullable(),
  takeStallMs: z.number().nonnegative().nullable(),
  corrupted: z.array(z.enum(errnoNames).nullable()),
});

export function parseSnapshotRecord(text: string, expectedId: string): SnapshotRecord {
  let json: unknown;
  try {
    json = JSON.parse(text);
  } catch (error) {
    throw new BlockError(
      "EINVAL",
      `snapshot record ${expectedId} is not valid JSON: ${(error as Error).message}`,
    );
  }
  const parsed = recordSchema.safeParse(json);
  if (!parsed.success) {
    const issue = parsed.error.issues[0];
    throw new BlockError(
      "EINVAL",
      `snapshot record ${expectedId}: ${issue ? `${issue.path.join(".")}: ${issue.message}` : "invalid"}`,
    );
  }
  if (parsed.data.id !== expectedId)
    throw new BlockError(
      "EINVAL",
      `snapshot record ${expectedId} names another snapshot (${parsed.data.id})`,
    );
  if (parsed.data.corrupted.length !== parsed.data.members.length)
    throw new BlockError("EINVAL", `snapshot record ${expectedId}: one corruption entry per member`);
  return parsed.data;
}

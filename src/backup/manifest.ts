/**
 * Manifest: one backup of one device (docs/backup-format.md, "Manifests"). It names every chunk of the image
 * in order (null for an all-zero chunk, which is stored as nothing), the CBT generation and changes number
 * the image was taken at (so the next incremental knows what changed since), and a digest of the whole
 * image: SHA-256 over the 32-byte ids of all chunks in order, zero chunks included with the id of zeros.
 * That digest is computable from chunk ids alone, so an incremental backup never re-reads unchanged data,
 * and a restore checks it from the ids it verified while decoding.
 */
import { createHash } from "node:crypto";
import { z } from "zod";
import { BlockError } from "../block/errors.js";

export const manifestFormat = "blocksnap-backup-manifest";
export const manifestVersion = 1;

const chunkId = z.string().regex(/^[0-9a-f]{64}$/);

export const manifestSchema = z.strictObject({
  format: z.literal(manifestFormat),
  version: z.literal(manifestVersion),
  id: z.string().regex(/^[0-9A-Za-z-]{1,64}$/),
  device: z.string().regex(/^[A-Za-z0-9._-]{1,64}$/),
  sizeBytes: z.int().positive(),
  chunkSizeBytes: z.int().positive(),
  level: z.enum(["full", "inc"]),
  parentId: z.string().nullable(),
  cbt: z
    .strictObject({
      generationId: z.string(),
      changesNumber: z.int().nonnegative(),
      blockSizeBytes: z.int().positive(),
    })
    .nullable(),
  snapshotId: z.string().nullable(),
  startedAt: z.string(),
  finishedAt: z.string(),
  durationMs: z.number().nonnegative(),
  readBytes: z.int().nonnegative(),
  newChunks: z.int().nonnegative(),
  newBytesStored: z.int().nonnegative(),
  imageDigest: chunkId,
  chunks: z.array(chunkId.nullable()),
});

export type Manifest = z.infer<typeof manifestSchema>;

export function parseManifest(bytes: Uint8Array, name: string): Manifest {
  let parsed: unknown;
  try {
    parsed = JSON.parse(Buffer.from(bytes.buffer, bytes.byteOffset, bytes.length).toString("utf8"));
  } catch {
    throw new BlockError("EIO", `Manifest ${name} is not JSON`);
  }
  const result = manifestSchema.safeParse(parsed);
  if (!result.success)
    throw new BlockError("EIO", `Manifest ${name} is malformed: ${result.error.issues[0]?.message}`);
  const manifest = result.data;
  if (manifest.chunks.length !== Math.ceil(manifest.sizeBytes / manifest.chunkSizeBytes))
    throw new BlockError(
      "EIO",
      `Manifest ${name} lists ${manifest.chunks.length} chunks for ${manifest.sizeBytes} bytes`,
    );
  return manifest;
}

export function chunkLengthAt(
  manifest: Pick<Manifest, "sizeBytes" | "chunkSizeBytes">,
  chunkIndex: number,
): number {
  return Math.min(manifest.chunkSizeBytes, manifest.sizeBytes - chunkIndex * manifest.chunkSizeBytes);
}

/**
 * The image digest. `zeroIdOf(length)` gives the id of an all-zero chunk of that length (only the last chunk
 * can be shorter).
 */
export function imageDigestOf(
  chunkIds: readonly (string | null)[],
  zeroIdOf: (chunkIndex: number) => string,
): string {
  const hash = createHash("sha256");
  chunkIds.forEach((id, chunkIndex) => {
    hash.update(Buffer.from(id ?? zeroIdOf(chunkIndex), "hex"));
  });
  return hash.digest("hex");
}

/**
 * A backup id that sorts by time to the millisecond: 20261204T013012345Z-1a2b3c. `latest`, an incremental's
 * base and prune all take the order of ids; ids of whole seconds (20261204T013012Z-…, before 2026-12-04)
 * put two backups of one second in the order of their random part.
 */
export function newBackupId(now: Date, randomHex: string): string {
  return `${now.toISOString().replace(/[-:.]/g, "")}-${randomHex}`;
}

/**
 * Whether the manifest's chunk list gives its image digest. With every chunk checked against its content
 * id as it is read, this checks the whole image without hashing it again. `zeroIdOf` names the all-zero
 * chunk of a length (the repository's codec: keyed when encrypted).
 */
export async function imageDigestMatches(
  manifest: Manifest,
  zeroIdOf: (lengthBytes: number) => Promise<string>,
): Promise<boolean> {
  const zeroIds = new Map<number, string>();
  for (let index = 0; index < manifest.chunks.length; index++) {
    const length = chunkLengthAt(manifest, index);
    if (!zeroIds.has(length)) zeroIds.set(length, await zeroIdOf(length));
  }
  const digest = imageDigestOf(manifest.chunks, (index) => zeroIds.get(chunkLengthAt(manifest, index)) ?? "");
  return digest === manifest.imageDigest;
}

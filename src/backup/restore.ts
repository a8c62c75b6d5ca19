/**
 * Reading backups back: restore one to a file (a regular file of the device's size, or an existing block
 * device of at least that size) and verify one or all (every chunk read, decoded and checked against its
 * content id; the image digest recomputed). A fast verify only asks the store whether every chunk object
 * is there (a HEAD per distinct chunk, no download): it finds deleted chunks, not damaged ones. Both read chunks through the codec worker pool, a bounded
 * number at a time, into reused shared buffers (chunk-slots.ts: no allocation per chunk), and write in
 * place with positioned writes; zero chunks are written as zeroes only
 * when the target is not a fresh file (a fresh file's holes already read as zero).
 */
import { open } from "node:fs/promises";
import { BlockError } from "../block/errors.js";
import { forEachBounded } from "./backup-run.js";
import { chunkLengthAt, imageDigestMatches, type Manifest } from "./manifest.js";
import { Repository } from "./repository.js";

/** Chunks in flight: enough to keep both codec workers and the disk busy at once. */
const chunksInFlight = 6;

/** A remote store wants more requests in flight than a local disk (its hint, e.g. --s3-parallel). */
function inFlightOf(repository: Repository): number {
  return Math.max(chunksInFlight, repository.store.inFlightHint ?? 0);
}

export interface RestoreOutcome {
  readonly bytesWritten: number;
  readonly chunksRead: number;
}

/** Writes backup `manifest` to `targetPath` (created when absent; a block device must be large enough). */
export async function restoreToFile(
  repository: Repository,
  manifest: Manifest,
  targetPath: string,
): Promise<RestoreOutcome> {
  // Every chunk is checked against its id as it is read; the chunk list against the image digest here.
  await checkImageDigest(repository, manifest);
  const file = await open(targetPath, "a+").then(async (handle) => {
    await handle.close();
    return open(targetPath, "r+");
  });
  try {
    const stats = await file.stat();
    const isBlockDevice = stats.isBlockDevice();
    if (!isBlockDevice) await file.truncate(manifest.sizeBytes);
    else if (stats.size < manifest.sizeBytes) {
      throw new BlockError(
        "ENOSPC",
        `${targetPath} is smaller than the backup (${manifest.sizeBytes} bytes)`,
      );
    }
    const fresh = !isBlockDevice && stats.size === 0;
    let bytesWritten = 0;
    let chunksRead = 0;
    const indexes = manifest.chunks.map((_id, index) => index);
    const slots = repository.newChunkSlots();
    await forEachBounded(indexes, inFlightOf(repository), async (index) => {
      const id = manifest.chunks[index] ?? null;
      const lengthBytes = chunkLengthAt(manifest, index);
      const offsetBytes = index * manifest.chunkSizeBytes;
      if (id === null && fresh) return;
      const slot = slots.take();
      try {
        let plain: Uint8Array;
        if (id === null) {
          plain = slot.plain.subarray(0, lengthBytes);
          plain.fill(0);
        } else {
          plain = await repository.readChunkInto(id, slot);
          chunksRead++;
        }
        if (plain.byteLength !== lengthBytes) {
          throw new BlockError(
            "EIO",
            `Chunk ${id} of backup ${manifest.id} holds ${plain.byteLength} bytes, not ${lengthBytes}`,
          );
        }
        let done = 0;
        while (done < lengthBytes) {
          const { bytesWritten: written } = await file.write(
            plain,
            done,
            lengthBytes - done,
            offsetBytes + done,
          );
          done += written;
        }
      } finally {
        slots.give(slot);
      }
      bytesWritten += lengthBytes;
    });
    await file.datasync();
    return { bytesWritten, chunksRead };
  } finally {
    await file.close();
  }
}

/** Fails with EIO, before anything is written, when a manifest's chunk list does not give its digest. */
export async function checkImageDigest(repository: Repository, manifest: Manifest): Promise<void> {
  if (!(await imageDigestMatches(manifest, (length) => repository.codec.zeroId(length))))
    throw new BlockError(
      "EIO",
      `Backup ${manifest.device}/${manifest.id}: its image digest does not match its chunk list`,
    );
}

export interface VerifyProblem {
  readonly backup: string;
  /** Image offsets of the chunk slots that name the bad chunk (empty for a whole-image problem). */
  readonly offsetsBytes: readonly number[];
  readonly problem: string;
}

/** Offsets named in a problem's text before "and N more": enough to find the place, bounded for huge images. */
const offsetsShown = 4;

/** The image offset of every slot of `manifest` that names chunk `id`. */
function offsetsOf(manifest: Manifest, id: string): number[] {
  const offsets: number[] = [];
  manifest.chunks.forEach((slotId, chunkIndex) => {
    if (slotId === id) offsets.push(chunkIndex * manifest.chunkSizeBytes);
  });
  return offsets;
}

/** A bad chunk as the user needs it: where in which backup, then what is wrong. */
function chunkProblem(manifest: Manifest, id: string, what: string): VerifyProblem {
  const offsetsBytes = offsetsOf(manifest, id);
  const shown = offsetsBytes.slice(0, offsetsShown).join(", ");
  const more = offsetsBytes.length > offsetsShown ? ` and ${offsetsBytes.length - offsetsShown} more` : "";
  return {
    backup: `${manifest.device}/${manifest.id}`,
    offsetsBytes,
    problem: `at offset ${shown}${more}: ${what}`,
  };
}

/** Requests in flight for a fast verify (HEADs are small). */
const headsInFlight = 16;

/** Reads every chunk of `manifests` (each distinct chunk once) and checks every image digest. */
export async function verifyBackups(
  repository: Repository,
  manifests: readonly Manifest[],
  options: { readonly fast?: boolean } = {},
): Promise<VerifyProblem[]> {
  if (options.fast) return await verifyChunksPresent(repository, manifests);
  const problems: VerifyProblem[] = [];
  const checked = new Map<string, string | null>();
  const slots = repository.newChunkSlots();
  for (const manifest of manifests) {
    const name = `${manifest.device}/${manifest.id}`;
    const ids = [...new Set(manifest.chunks.filter((id): id is string => id !== null))];
    await forEachBounded(ids, inFlightOf(repository), async (id) => {
      if (checked.has(id)) return;
      const slot = slots.take();
      try {
        await repository.readChunkInto(id, slot);
        checked.set(id, null);
      } catch (error) {
        checked.set(id, error instanceof Error ? error.message : String(error));
      } finally {
        slots.give(slot);
      }
    });
    for (const id of ids) {
      const problem = checked.get(id);
      if (problem) problems.push(chunkProblem(manifest, id, problem));
    }
    if (!(await imageDigestMatches(manifest, (length) => repository.codec.zeroId(length))))
      problems.push({ backup: name, offsetsBytes: [], problem: "image digest mismatch" });
  }
  return problems;
}

/** The fast verify: every chunk object a manifest names is present in the store (the store is asked). */
async function verifyChunksPresent(
  repository: Repository,
  manifests: readonly Manifest[],
): Promise<VerifyProblem[]> {
  const present = new Map<string, boolean>();
  const problems: VerifyProblem[] = [];
  for (const manifest of manifests) {
    const ids = [...new Set(manifest.chunks.filter((id): id is string => id !== null))];
    await forEachBounded(ids, headsInFlight, async (id) => {
      if (!present.has(id)) present.set(id, (await repository.store.head(Repository.chunkKey(id))) !== null);
    });
    for (const id of ids) {
      if (present.get(id) !== true) problems.push(chunkProblem(manifest, id, `chunk ${id} is missing`));
    }
  }
  return problems;
}

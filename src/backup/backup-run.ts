/**
 * One backup of one device into a Repository (docs/backup-format.md).
 *
 * Reads a taken snapshot's image through the engine (never over the network): its own snapshot (create,
 * take with the usual freeze, destroy at the end, even on failure or cancel), or one the caller names.
 * Level: `full` reads every chunk; `inc` reads only chunks holding a CBT block above the changes number of
 * the device's latest manifest, in the same generation, and copies every other chunk id from it; `auto` is
 * `inc` when that holds and `full` otherwise, with the reason. Chunks go through the codec worker pool with
 * a bounded window (inFlightMax), so memory stays at a few chunks and the event loop keeps serving; each
 * chunk in flight has a reused pair of shared buffers (chunk-slots.ts): read, hash, compress and write
 * allocate nothing per chunk.
 *
 * Crash safety: chunks are put (atomically; durably in batches, all of them synced before the manifest),
 * and the manifest is written last; a kill at
 * any point leaves only chunks no manifest names. Reused chunk ids are checked to still exist just before
 * the manifest is written (GC may have removed a chunk that no manifest named any more); on a remote store
 * the chunk index answers, rebuilt first if GC ran meanwhile, and covers every chunk named.
 */

import type { BlockDevice } from "../block/device.js";
import { BlockError } from "../block/errors.js";
import type { CbtInfo } from "../cbt/cbt-map.js";
import { chunkLengthAt, imageDigestOf, type Manifest, manifestFormat, manifestVersion } from "./manifest.js";
import type { Repository } from "./repository.js";

export type BackupLevel = "full" | "inc" | "auto";

/** What a backup needs of the engine (the real Engine satisfies it). */
export interface BackupEngine {
  createSnapshot(options: {
    storage: string;
    limitBytes: number;
    devices: string[];
    transient: boolean;
  }): Promise<{ id: string }>;
  takeSnapshot(id: string): Promise<unknown>;
  destroySnapshot(id: string): Promise<void>;
  snapshotInfo(id: string): { state: string; devices: readonly { name: string; imageName: string | null }[] };
  findExport(
    name: string,
  ): { device: BlockDevice; changedBlocks?: { generationId: string; changesNumber: number } } | undefined;
  cbtInfo(name: string): CbtInfo;
  cbtRead(name: string): Uint8Array;
}

export interface BackupProgress {
  readonly phase: "snapshot" | "reading" | "manifest" | "done";
  readonly totalBytes: number;
  readonly doneBytes: number;
  readonly newBytesStored: number;
}

export interface BackupParams {
  readonly engine: BackupEngine;
  readonly repository: Repository;
  readonly device: string;
  readonly level: BackupLevel;
  readonly snapshotId?: string | null;
  /** Difference storage of the backup's own snapshot. */
  readonly storage: string;
  readonly storageLimitBytes: number;
  readonly signal?: AbortSignal;
  readonly onProgress?: (progress: BackupProgress) => void;
  /** A line for the user: the level chosen and why (once, before the first chunk is read). */
  readonly onNote?: (note: string, level: "full" | "inc") => void;
  readonly inFlightMax?: number;
}

export interface BackupOutcome {
  readonly manifest: Manifest;
  readonly levelReason: string;
}

const inFlightDefault = 4;

export async function runBackup(params: BackupParams): Promise<BackupOutcome> {
  const { engine, repository, device } = params;
  const startedAt = new Date();
  const previous = await latestManifest(repository, device);
  checkAborted(params.signal);
  let ownSnapshot: string | null = null;
  try {
    let snapshotId = params.snapshotId ?? null;
    params.onProgress?.({ phase: "snapshot", totalBytes: 0, doneBytes: 0, newBytesStored: 0 });
    if (snapshotId === null) {
      const created = await engine.createSnapshot({
        storage: params.storage,
        limitBytes: params.storageLimitBytes,
        devices: [device],
        // A backup's own snapshot dies with the job: a restart must not keep the device busy with it.
        transient: true,
      });
      ownSnapshot = created.id;
      snapshotId = created.id;
      await engine.takeSnapshot(snapshotId);
    }
    // CBT info and map in the same tick as the image is found: while the snapshot lives they stay those
    // of its take (the device is in one snapshot at a time), which the image's own CBT numbers confirm.
    const found = imageOf(engine, snapshotId, device);
    const image = found.device;
    const cbtNow = engine.cbtInfo(device);
    const cbt = sameTake(found.changedBlocks, cbtNow) ? cbtNow : null;
    const cbtMap = cbt === null ? new Uint8Array(0) : engine.cbtRead(device);
    const plan = planLevel(params.level, previous, cbt, image.sizeBytes, repository.chunkSizeBytes);
    params.onNote?.(plan.reason, plan.base === null ? "full" : "inc");
    checkAborted(params.signal);

    const chunkCount = Math.ceil(image.sizeBytes / repository.chunkSizeBytes);
    const geometry = { sizeBytes: image.sizeBytes, chunkSizeBytes: repository.chunkSizeBytes };
    const chunks: (string | null)[] = new Array(chunkCount).fill(null);
    const toRead =
      plan.base === null || cbt === null
        ? allChunks(chunkCount)
        : changedChunks(plan.base, cbt, cbtMap, geometry);
    if (plan.base !== null) {
      for (const [index, id] of plan.base.chunks.entries()) chunks[index] = id;
    }
    const totalBytes = toRead.reduce((sum, index) => sum + chunkLengthAt(geometry, index), 0);
    let doneBytes = 0;
    let newChunks = 0;
    let newBytesStored = 0;
    const seenNew = new Set<string>();
    const report = () => params.onProgress?.({ phase: "reading", totalBytes, doneBytes, newBytesStored });
    report();

    const slots = repository.newChunkSlots();
    const backupOne = async (chunkIndex: number) => {
      checkAborted(params.signal);
      const lengthBytes = chunkLengthAt(geometry, chunkIndex);
      const slot = slots.take();
      try {
        const plain = slot.plain.subarray(0, lengthBytes);
        await image.read(chunkIndex * repository.chunkSizeBytes, plain);
        // The worker reads the slot and writes the stored object into it in place (shared memory).
        const { id, storedLength } = await repository.codec.encodeInto(plain, slot.stored);
        if (storedLength === null) {
          chunks[chunkIndex] = null;
        } else {
          chunks[chunkIndex] = id;
          if (!seenNew.has(id) && !(await repository.hasChunk(id))) {
            seenNew.add(id);
            await repository.putChunkBatched(id, slot.stored.subarray(0, storedLength));
            newChunks += 1;
            newBytesStored += storedLength;
          }
        }
      } finally {
        slots.give(slot);
      }
      doneBytes += lengthBytes;
      report();
    };
    const inFlight = params.inFlightMax ?? Math.max(inFlightDefault, repository.store.inFlightHint ?? 0);
    try {
      await forEachBounded(toRead, inFlight, backupOne);
    } catch (error) {
      // After a failure or cancel the chunks already written are kept, unreferenced (the next backup
      // finds them, GC removes them past its grace period); a failing sync removes its batch.
      await repository.syncChunks().catch(() => undefined);
      throw error;
    }
    // Durable and visible before the manifest names them.
    await repository.syncChunks();

    params.onProgress?.({ phase: "manifest", totalBytes, doneBytes, newBytesStored });
    if (await repository.revalidateChunkIndex()) await checkIndexedChunksExist(repository, chunks);
    else if (plan.base !== null) await checkReusedChunksExist(repository, chunks, new Set(toRead));
    const zeroIds = new Map<number, string>();
    for (const length of new Set([repository.chunkSizeBytes, chunkLengthAt(geometry, chunkCount - 1)]))
      zeroIds.set(length, await repository.codec.zeroId(length));
    checkAborted(params.signal);
    const finishedAt = new Date();
    const manifest: Manifest = {
      format: manifestFormat,
      version: manifestVersion,
      id: repository.newBackupId(),
      device,
      sizeBytes: image.sizeBytes,
      chunkSizeBytes: repository.chunkSizeBytes,
      level: plan.base === null ? "full" : "inc",
      parentId: plan.base?.id ?? null,
      cbt:
        cbt === null
          ? null
          : {
              generationId: cbt.generationId,
              changesNumber: cbt.changesNumber,
              blockSizeBytes: cbt.blockSizeBytes,
            },
      snapshotId,
      startedAt: startedAt.toISOString(),
      finishedAt: finishedAt.toISOString(),
      durationMs: finishedAt.getTime() - startedAt.getTime(),
      readBytes: doneBytes,
      newChunks,
      newBytesStored,
      imageDigest: imageDigestOf(chunks, (index) => zeroIds.get(chunkLengthAt(geometry, index)) ?? ""),
      chunks,
    };
    await repository.writeManifest(manifest);
    params.onProgress?.({ phase: "done", totalBytes, doneBytes, newBytesStored });
    return { manifest, levelReason: plan.reason };
  } finally {
    if (ownSnapshot !== null) await engine.destroySnapshot(ownSnapshot).catch(() => undefined);
  }
}

async function latestManifest(repository: Repository, device: string): Promise<Manifest | null> {
  const refs = await repository.listManifests(device);
  const last = refs[refs.length - 1];
  return last === undefined ? null : await repository.readManifest(last);
}

/** The image's CBT numbers are the device's now: the CBT map describes what changed up to that image. */
function sameTake(image: { generationId: string; changesNumber: number } | undefined, now: CbtInfo): boolean {
  return (
    image !== undefined &&
    image.changesNumber >= 1 &&
    image.generationId === now.generationId &&
    image.changesNumber === now.changesNumber
  );
}

function imageOf(
  engine: BackupEngine,
  snapshotId: string,
  device: string,
): NonNullable<ReturnType<BackupEngine["findExport"]>> {
  const info = engine.snapshotInfo(snapshotId);
  const member = info.devices.find((candidate) => candidate.name === device);
  if (member === undefined)
    throw new BlockError("EINVAL", `Snapshot ${snapshotId} does not hold device ${device}`);
  if (member.imageName === null) throw new BlockError("EINVAL", `Snapshot ${snapshotId} is not taken`);
  const found = engine.findExport(member.imageName);
  if (found === undefined) throw new BlockError("ENOENT", `Image ${member.imageName} is gone`);
  return found;
}

interface LevelPlan {
  readonly base: Manifest | null;
  readonly reason: string;
}

/** Chooses full or incremental; `inc` that cannot be done is an error, `auto` falls back with the reason. */
export function planLevel(
  level: BackupLevel,
  previous: Manifest | null,
  cbt: CbtInfo | null,
  sizeBytes: number,
  chunkSizeBytes: number,
): LevelPlan {
  if (level === "full") return { base: null, reason: "full backup (asked for)" };
  let why: string | null = null;
  if (previous === null) why = "no earlier backup of this device in this repository";
  else if (cbt === null) why = "the snapshot's CBT take is not the device's current one";
  else if (previous.cbt === null) why = `backup ${previous.id} has no CBT state`;
  else if (previous.cbt.generationId !== cbt.generationId)
    why = `CBT generation changed since backup ${previous.id} (${previous.cbt.generationId} → ${cbt.generationId}): a restart, reset or wrap`;
  else if (previous.sizeBytes !== sizeBytes) why = `device size changed since backup ${previous.id}`;
  else if (previous.chunkSizeBytes !== chunkSizeBytes) why = `chunk size differs from backup ${previous.id}`;
  else if (previous.cbt.changesNumber >= cbt.changesNumber)
    why = `the snapshot is not newer than backup ${previous.id} (changes number ${cbt.changesNumber} ≤ ${previous.cbt.changesNumber})`;
  if (why === null && previous !== null)
    return {
      base: previous,
      reason: `incremental since backup ${previous.id} (changes number ${previous.cbt?.changesNumber})`,
    };
  if (level === "inc") throw new BlockError("EINVAL", `Cannot back up incrementally: ${why}`);
  return { base: null, reason: `full backup: ${why}` };
}

function allChunks(count: number): number[] {
  return Array.from({ length: count }, (_unused, index) => index);
}

/** Chunk indices holding a CBT block changed after the base's changes number. */
function changedChunks(
  base: Manifest,
  cbt: CbtInfo,
  map: Uint8Array,
  geometry: { sizeBytes: number; chunkSizeBytes: number },
): number[] {
  const since = base.cbt?.changesNumber ?? 0;
  const changed = new Set<number>();
  const chunkCount = Math.ceil(geometry.sizeBytes / geometry.chunkSizeBytes);
  for (let blockIndex = 0; blockIndex < map.length; blockIndex++) {
    if ((map[blockIndex] ?? 0) <= since) continue;
    const first = Math.floor((blockIndex * cbt.blockSizeBytes) / geometry.chunkSizeBytes);
    const last = Math.floor(((blockIndex + 1) * cbt.blockSizeBytes - 1) / geometry.chunkSizeBytes);
    for (let chunkIndex = first; chunkIndex <= Math.min(last, chunkCount - 1); chunkIndex++)
      changed.add(chunkIndex);
  }
  return [...changed].sort((a, b) => a - b);
}

async function checkReusedChunksExist(
  repository: Repository,
  chunks: readonly (string | null)[],
  read: ReadonlySet<number>,
): Promise<void> {
  const reused = new Set<string>();
  chunks.forEach((id, index) => {
    if (id !== null && !read.has(index)) reused.add(id);
  });
  await forEachBounded([...reused], 16, async (id) => {
    if (!(await repository.hasChunk(id)))
      throw new BlockError(
        "EIO",
        `Chunk ${id} of the previous backup is gone (removed by GC?): run a full backup`,
      );
  });
}

/** With a chunk index (remote stores), every chunk named, found or reused, is checked in memory. */
async function checkIndexedChunksExist(
  repository: Repository,
  chunks: readonly (string | null)[],
): Promise<void> {
  for (const id of new Set(chunks)) {
    if (id !== null && !(await repository.hasChunk(id)))
      throw new BlockError(
        "EIO",
        `Chunk ${id} was removed by garbage collection during this backup: run the backup again`,
      );
  }
}

/** Runs `work` over `items` with at most `limit` at a time; the first failure stops new starts and is thrown. */
export async function forEachBounded<T>(
  items: readonly T[],
  limit: number,
  work: (item: T) => Promise<void>,
): Promise<void> {
  let next = 0;
  let failure: unknown = null;
  const lane = async () => {
    while (failure === null && next < items.length) {
      const item = items[next] as T;
      next += 1;
      try {
        await work(item);
      } catch (error) {
        failure ??= error;
      }
    }
  };
  await Promise.all(Array.from({ length: Math.min(limit, items.length) }, lane));
  if (failure !== null) throw failure;
}

function checkAborted(signal: AbortSignal | undefined): void {
  if (signal?.aborted) throw new BlockError("ECANCELED", "Backup cancelled");
}

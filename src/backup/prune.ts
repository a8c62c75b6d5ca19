/**
 * Prune and garbage collection of a repository (issue 13 item 4, docs/backup-format.md "Prune").
 *
 * prune: per device, keep the newest `keepLast` backups and delete the other manifests. Backup ids sort by
 * time, so "newest" is the end of listManifests. The newest backup of a device is always kept (keepLast ≥ 1),
 * so the next incremental still finds its base.
 * collectGarbage: delete every chunk that no remaining manifest names and that is older than the grace
 * period. A backup writes its chunks before its manifest, so its fresh chunks look unreferenced until it
 * ends; the grace period (default 1 day, like PBS's) keeps them. Any manifest that cannot be read stops the
 * collection before anything is deleted: an unreadable manifest may reference any chunk.
 * Before its first deletion GC rewrites the repository's gc-marker, so the chunk indexes of remote
 * repositories (chunk-index.ts) on every host rebuild before they are trusted again.
 * Not done yet: a backup running during the collection that deduplicates against an old chunk only a
 * pruned backup named (it sees the chunk and does not rewrite it) can lose that chunk; run prune when no
 * backup of the repository runs. No lock file between hosts.
 */
import { assert } from "../util/assert.js";
import type { ManifestRef, Repository } from "./repository.js";

export const pruneGraceMsDefault = 24 * 60 * 60 * 1000;

export interface PruneOptions {
  readonly keepLast: number;
  readonly device?: string;
  readonly dryRun?: boolean;
}

export interface PruneOutcome {
  readonly kept: string[];
  readonly removed: string[];
}

export async function pruneBackups(repository: Repository, options: PruneOptions): Promise<PruneOutcome> {
  assert(Number.isSafeInteger(options.keepLast) && options.keepLast >= 1, "prune keeps at least one backup");
  const byDevice = new Map<string, ManifestRef[]>();
  for (const ref of await repository.listManifests(options.device)) {
    const list = byDevice.get(ref.device) ?? [];
    list.push(ref);
    byDevice.set(ref.device, list);
  }
  const kept: string[] = [];
  const removed: string[] = [];
  for (const refs of byDevice.values()) {
    const cut = Math.max(0, refs.length - options.keepLast);
    for (const ref of refs.slice(0, cut)) {
      if (options.dryRun !== true) await repository.deleteManifest(ref);
      removed.push(`${ref.device}/${ref.id}`);
    }
    for (const ref of refs.slice(cut)) kept.push(`${ref.device}/${ref.id}`);
  }
  return { kept, removed };
}

export interface GarbageOptions {
  readonly graceMs?: number;
  readonly dryRun?: boolean;
  readonly nowMs?: number;
}

export interface GarbageOutcome {
  readonly referencedChunks: number;
  readonly removedChunks: number;
  readonly removedBytes: number;
  readonly keptInGrace: number;
}

export async function collectGarbage(
  repository: Repository,
  options: GarbageOptions = {},
): Promise<GarbageOutcome> {
  const graceMs = options.graceMs ?? pruneGraceMsDefault;
  assert(Number.isFinite(graceMs) && graceMs >= 0, "grace period is a non-negative duration");
  const referenced = new Set<string>();
  for (const ref of await repository.listManifests()) {
    const manifest = await repository.readManifest(ref);
    for (const id of manifest.chunks) if (id !== null) referenced.add(id);
  }
  const cutoffMs = (options.nowMs ?? Date.now()) - graceMs;
  let removedChunks = 0;
  let removedBytes = 0;
  let keptInGrace = 0;
  for await (const chunk of repository.listChunks()) {
    if (referenced.has(chunk.id)) continue;
    if (chunk.modifiedMs > cutoffMs) {
      keptInGrace += 1;
      continue;
    }
    if (options.dryRun !== true) {
      if (removedChunks === 0) await repository.markGarbageCollection();
      await repository.deleteChunk(chunk.id);
    }
    removedChunks += 1;
    removedBytes += chunk.sizeBytes;
  }
  return { referencedChunks: referenced.size, removedChunks, removedBytes, keptInGrace };
}

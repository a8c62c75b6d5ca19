/**
 * Prune and garbage collection of a repository (issue 13 item 4, docs/backup-format.md "Prune").
 *
 * prune: per device, keep the newest `keepLast` backups, the newest backup of each of the last `keepDaily`
 * days that have backups and of each of the last `keepWeekly` ISO weeks that have backups (restic's rules;
 * days and weeks in UTC, read from the backup id's time), and delete the other manifests. Backup ids sort by
 * time, so "newest" is the end of listManifests. The newest backup of a device is always kept, so the next
 * incremental still finds its base; a backup whose id carries no time is never deleted.
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
  /** Newest backups kept per device (at least 1: the newest is always kept anyway). */
  readonly keepLast: number;
  /** The newest backup of each of the last N days that have backups. */
  readonly keepDaily?: number;
  /** The newest backup of each of the last N ISO weeks that have backups. */
  readonly keepWeekly?: number;
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
    const keep = keptIds(refs, options);
    for (const ref of refs) {
      if (keep.has(ref.id)) {
        kept.push(`${ref.device}/${ref.id}`);
        continue;
      }
      if (options.dryRun !== true) await repository.deleteManifest(ref);
      removed.push(`${ref.device}/${ref.id}`);
    }
  }
  return { kept, removed };
}

/** The ids of one device's backups (oldest first) that the policy keeps. */
export function keptIds(
  refs: readonly Pick<ManifestRef, "id">[],
  policy: Pick<PruneOptions, "keepLast" | "keepDaily" | "keepWeekly">,
): Set<string> {
  const newestFirst = [...refs].reverse();
  const keep = new Set<string>(newestFirst.slice(0, Math.max(1, policy.keepLast)).map((ref) => ref.id));
  const keepOnePer = (count: number | undefined, period: (time: Date) => string) => {
    if (count === undefined || count <= 0) return;
    const periods = new Set<string>();
    for (const ref of newestFirst) {
      const time = backupTime(ref.id);
      if (time === null) continue;
      const key = period(time);
      if (periods.has(key)) continue;
      if (periods.size >= count) break;
      periods.add(key);
      keep.add(ref.id);
    }
  };
  keepOnePer(policy.keepDaily, (time) => time.toISOString().slice(0, 10));
  keepOnePer(policy.keepWeekly, isoWeek);
  for (const ref of refs) if (backupTime(ref.id) === null) keep.add(ref.id);
  return keep;
}

/** The time in a backup id (`YYYYMMDDTHHMMSS[mmm]Z-…`, UTC), or null when it carries none. */
function backupTime(id: string): Date | null {
  const match = /^(\d{4})(\d{2})(\d{2})T(\d{2})(\d{2})(\d{2})(?:\d{3})?Z/.exec(id);
  if (!match) return null;
  const [, year, month, day, hour, minute, second] = match.map(Number);
  const time = new Date(Date.UTC(year!, month! - 1, day!, hour!, minute!, second!));
  return Number.isNaN(time.getTime()) ? null : time;
}

/** ISO 8601 week of a UTC time, as `YYYY-Www` (weeks start on Monday; week 1 holds the first Thursday). */
function isoWeek(time: Date): string {
  const thursday = new Date(Date.UTC(time.getUTCFullYear(), time.getUTCMonth(), time.getUTCDate()));
  thursday.setUTCDate(thursday.getUTCDate() + 3 - ((thursday.getUTCDay() + 6) % 7));
  const yearStart = Date.UTC(thursday.getUTCFullYear(), 0, 1);
  const week = Math.floor((thursday.getTime() - yearStart) / 86_400_000 / 7) + 1;
  return `${thursday.getUTCFullYear()}-W${String(week).padStart(2, "0")}`;
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

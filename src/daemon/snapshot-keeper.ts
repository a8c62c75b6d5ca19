/**
 * SnapshotKeeper: keeps snapshots across restarts of the daemon (the engine's SnapshotPersistence seam).
 * Per snapshot, in `<state>/snapshots/`: `<id>.json`, the record (members, storage areas, policy, take
 * times, corruption), replaced atomically at create, append-storage, take and corruption; and
 * `<id>.chunks`, the chunk log (src/persist/chunk-log.ts), a record per stored chunk written before the
 * origin write that chunk protects. A directory storage is a named file in that directory
 * (`blocksnap-<id>-<n>.diff`), so the data itself survives too.
 *
 * What survives what:
 * - clean stop (SIGTERM, a planned restart): the storage is flushed and the log sealed; everything comes
 *   back exactly (same id, state, images, chunk map).
 * - kill -9 of the daemon (or of a supervised engine): every record whose write returned is in the page
 *   cache; the map comes back exactly (a chunk whose record was not written had not let its origin write
 *   go on, so the image reads the origin for it, still right).
 * - host crash: an unsealed log written under another boot is not trusted: the snapshot comes back
 *   corrupted (EIO on its images, its reason in the log and in `status`), never with wrong bytes. A log
 *   sealed by a clean stop is trusted.
 * - `memory:` storage: kept in no file; reported lost at the next start.
 * A snapshot that cannot be brought back (a member device gone or resized, the storage missing) is
 * reported lost with the reason; its records and named storage files are removed.
 *
 * Locking: one writer per snapshot's log (records are appended concurrently; positions are reserved in
 * call order); record files are replaced atomically; all of it on the event loop.
 */
import { mkdir, readdir, readFile, rm } from "node:fs/promises";
import { join } from "node:path";
import { BlockError, toBlockError } from "../block/errors.js";
import type { Engine } from "../engine/engine.js";
import type { SnapshotPersistence, SnapshotRecord } from "../engine/engine-types.js";
import { BackendPersistFile } from "../persist/backend-persist-file.js";
import { bootIdPrefix, ChunkLogWriter, decodeChunkLog } from "../persist/chunk-log.js";
import type { Logger } from "../util/logger.js";
import { writeFileAtomic } from "./atomic-write.js";
import { currentBootId } from "./cbt-keeper.js";
import { parseSnapshotRecord } from "./snapshot-record.js";

/** What happened to one kept snapshot at start (status and the log). */
export interface SnapshotRecovery {
  readonly id: string;
  readonly outcome: "restored" | "corrupted" | "lost";
  readonly reason: string;
  readonly chunks: number;
}

export class SnapshotKeeper implements SnapshotPersistence {
  private readonly directory: string;
  private readonly logger: Logger;
  private readonly bootId = currentBootId();
  private readonly logs = new Map<string, Promise<ChunkLogWriter>>();
  private recoveriesAtStart: SnapshotRecovery[] = [];

  constructor(stateDir: string, logger: Logger) {
    this.directory = join(stateDir, "snapshots");
    this.logger = logger;
  }

  get recoveries(): readonly SnapshotRecovery[] {
    return this.recoveriesAtStart;
  }

  async save(record: SnapshotRecord): Promise<void> {
    await mkdir(this.directory, { recursive: true, mode: 0o700 });
    await writeFileAtomic(this.recordPath(record.id), `${JSON.stringify(record)}\n`);
    if (!this.logs.has(record.id)) await this.openLog(record.id, 0);
  }

  async chunkStored(snapshotId: string, memberIndex: number, chunkIndex: number, locationCode: number) {
    const log = this.logs.get(snapshotId);
    if (!log) throw new BlockError("EIO", `snapshot ${snapshotId} has no chunk log`);
    await (await log).stored(memberIndex, chunkIndex, locationCode);
  }

  async forget(snapshotId: string): Promise<void> {
    await this.closeLog(snapshotId);
    await rm(this.recordPath(snapshotId), { force: true });
    await rm(this.logPath(snapshotId), { force: true });
  }

  async closed(snapshotId: string): Promise<void> {
    const log = this.logs.get(snapshotId);
    if (!log) return;
    this.logs.delete(snapshotId);
    const writer = await log;
    try {
      await writer.seal();
    } finally {
      await writer.close();
    }
  }

  /**
   * Brings back every kept snapshot into `engine` (its devices already attached). Never throws for one
   * snapshot: what cannot come back is reported lost and its records removed.
   */
  async restoreAll(engine: Engine): Promise<readonly SnapshotRecovery[]> {
    let names: string[];
    try {
      names = await readdir(this.directory);
    } catch (error) {
      if ((error as NodeJS.ErrnoException).code === "ENOENT") return [];
      throw toBlockError(error, `cannot read ${this.directory}`);
    }
    const recoveries: SnapshotRecovery[] = [];
    const ids = names
      .filter((entry) => entry.endsWith(".json"))
      .map((entry) => entry.slice(0, -".json".length));
    const storageDirectories = new Set<string>();
    for (const id of ids.sort()) {
      const recovery = await this.restoreOne(engine, id, storageDirectories);
      recoveries.push(recovery);
    }
    recoveries.push(...(await this.collectStrayFiles(storageDirectories, new Set(ids))));
    for (const recovery of recoveries) {
      const level = recovery.outcome === "restored" ? "info" : "warn";
      this.logger[level]({ snapshot: recovery.id, ...recovery }, `snapshot ${recovery.outcome} at start`);
    }
    this.recoveriesAtStart = recoveries;
    return recoveries;
  }

  /**
   * Storage files named for snapshots that have no record (a crash between making the file and writing the
   * record, or records removed by hand), in the directories the kept snapshots use: reported and removed.
   */
  private async collectStrayFiles(directories: Set<string>, known: Set<string>): Promise<SnapshotRecovery[]> {
    const found: SnapshotRecovery[] = [];
    for (const directory of directories) {
      const entries = await readdir(directory).catch(() => [] as string[]);
      for (const entry of entries) {
        const match = /^blocksnap-([0-9a-f-]{36})-\d+\.diff$/.exec(entry);
        if (!match?.[1] || known.has(match[1])) continue;
        await rm(join(directory, entry), { force: true });
        found.push({
          id: match[1],
          outcome: "lost",
          reason: `a storage file with no record, removed: ${join(directory, entry)}`,
          chunks: 0,
        });
      }
    }
    return found;
  }

  private async restoreOne(
    engine: Engine,
    id: string,
    storageDirectories: Set<string>,
  ): Promise<SnapshotRecovery> {
    let record: SnapshotRecord | null = null;
    try {
      record = parseSnapshotRecord(await readFile(this.recordPath(id), "utf8"), id);
      for (const area of record.storageAreas)
        if (area.kind === "directory") storageDirectories.add(area.path);
      if (record.storageAreas.some((area) => area.kind === "memory" || area.filePath === null))
        throw new BlockError(
          "ENOENT",
          "its difference storage was in memory (memory: does not survive a restart)",
        );
      const log = decodeChunkLog(await readLog(this.logPath(id)));
      const crashedHost = !log.sealed && log.lastBoot !== null && log.lastBoot !== bootIdPrefix(this.bootId);
      const untrustedReason =
        crashedHost && record.takenAtMs !== null
          ? "a host crash before its chunk records were durable (the log was not sealed by a clean stop)"
          : null;
      const chunks = record.members.map((_, memberIndex) => [...(log.chunks.get(memberIndex) ?? new Map())]);
      const info = await engine.restoreSnapshot({ record, chunks, untrustedReason });
      await this.openLog(id, log.endBytes);
      const chunkCount = chunks.reduce((sum, entries) => sum + entries.length, 0);
      if (untrustedReason !== null)
        return { id, outcome: "corrupted", reason: untrustedReason, chunks: chunkCount };
      const how = log.sealed ? "a clean stop" : "a daemon crash (every written chunk record kept)";
      return {
        id,
        outcome: info.state === "corrupted" ? "corrupted" : "restored",
        reason: `${info.state} after ${how}`,
        chunks: chunkCount,
      };
    } catch (error) {
      const reason = error instanceof Error ? error.message : String(error);
      await this.collect(id, record);
      return { id, outcome: "lost", reason, chunks: 0 };
    }
  }

  /** Removes the records of a snapshot that cannot come back, and the files it made in directories. */
  private async collect(id: string, record: SnapshotRecord | null): Promise<void> {
    await this.closeLog(id);
    for (const area of record?.storageAreas ?? []) {
      if (area.kind === "directory" && area.filePath !== null) await rm(area.filePath, { force: true });
    }
    await rm(this.recordPath(id), { force: true });
    await rm(this.logPath(id), { force: true });
  }

  private async openLog(id: string, endBytes: number): Promise<void> {
    const opening = ChunkLogWriter.open(BackendPersistFile.open(this.logPath(id)), endBytes, this.bootId);
    this.logs.set(id, opening);
    try {
      await opening;
    } catch (error) {
      // Not kept: a later save() opens the log again instead of every record failing on this attempt.
      if (this.logs.get(id) === opening) this.logs.delete(id);
      throw error;
    }
  }

  private async closeLog(id: string): Promise<void> {
    const log = this.logs.get(id);
    if (!log) return;
    this.logs.delete(id);
    await (await log).close().catch(() => {});
  }

  private recordPath(id: string): string {
    return join(this.directory, `${id}.json`);
  }

  private logPath(id: string): string {
    return join(this.directory, `${id}.chunks`);
  }
}

async function readLog(path: string): Promise<Uint8Array> {
  try {
    return new Uint8Array(await readFile(path));
  } catch (error) {
    if ((error as NodeJS.ErrnoException).code === "ENOENT") return new Uint8Array(0);
    throw toBlockError(error, `cannot read ${path}`);
  }
}

/**
 * Backup jobs run by the daemon (issue 13): `POST /v1/backups` starts one and answers at once with its
 * id; `GET /v1/backups/jobs/:id` reports its phase, progress and outcome. The daemon does the work so the
 * image is read in-process (no NBD round trips) while every device keeps serving: the CPU work (hash,
 * compress, encrypt) runs on the repository's codec worker threads, and at most a few chunks are in
 * flight (backup-run.ts).
 *
 * One job per device at a time (EBUSY otherwise); at most jobsKeptMax finished jobs are remembered.
 * A job's own snapshot lives in `storage` (default: an anonymous temporary file in the system's temporary
 * directory; the state directory is refused as storage by the path policy) with
 * `limitBytes` (default: a quarter of the device, at least 64 MiB); it is destroyed at the end, whatever
 * happens. With `snapshotId` the job reads that snapshot instead (the caller's own: taken, holding the
 * device, and never destroyed by the job). An s3:// repository takes its credentials from the daemon's own environment or shared
 * credentials file (s3-credentials.ts), never from the request.
 *
 * Cancel (`POST /v1/backups/jobs/:id/cancel`) aborts the job's signal: the run starts no new chunk (the
 * few in flight end), destroys its own snapshot and writes no manifest, so the repository holds only chunks
 * no manifest names (GC's to remove) and verifies; the job ends `cancelled`. A job id may be shortened to a
 * unique prefix of at least 4 characters.
 *
 * Restore jobs (`POST /v1/backups/restores`, kind `restore`) share the table, status and cancel: one backup
 * written onto a blocksnap device's origin (restore-device.ts), so CBT and a snapshot of it see the writes.
 * Checked before the job starts (the answer is the error): the backup exists, the device is at least as
 * large, no job runs on it, and nothing uses it — no NBD client on its export and no loop device over its
 * FUSE file (`force` overrides; its users then see the contents change under them). Not done yet: jobs that survive a daemon restart (an interrupted
 * backup leaves only unreferenced chunks; run it again).
 *
 * Every job reports what it does as events (backup-job-events.ts): `started` once its level is chosen,
 * then one of `finished`, `failed`, `cancelled`; `events` is the daemon-wide log a user follows.
 */
import { randomUUID } from "node:crypto";
import { tmpdir } from "node:os";
import { type BackupEngine, type BackupLevel, type BackupProgress, runBackup } from "../backup/backup-run.js";
import type { Manifest } from "../backup/manifest.js";
import { Repository } from "../backup/repository.js";
import { readKeyFile } from "../backup/repository-key.js";
import { restoreToDevice } from "../backup/restore-device.js";
import type { S3Settings } from "../backup/s3-store.js";
import { BlockError, toBlockError } from "../block/errors.js";
import type { Logger } from "../util/logger.js";
import { BackupJobEvents } from "./backup-job-events.js";

const jobsKeptMax = 32;
const snapshotLimitBytesMin = 64 * 1024 * 1024;

export interface BackupRequest {
  readonly device: string;
  readonly repository: string;
  readonly level: BackupLevel;
  readonly keyFile?: string | undefined;
  readonly storage?: string | undefined;
  readonly limitBytes?: number | undefined;
  /** A taken snapshot of the device to read instead of the job's own (left alone at the end). */
  readonly snapshotId?: string | undefined;
  /** Endpoint, region and parallelism of an s3:// repository (credentials: the daemon's environment). */
  readonly s3?: S3Settings | undefined;
}

export interface RestoreRequest {
  readonly device: string;
  readonly repository: string;
  /** DEVICE/ID, an id, or DEVICE/latest. */
  readonly backup: string;
  readonly keyFile?: string | undefined;
  readonly s3?: S3Settings | undefined;
  /** Write even while the device is in use. */
  readonly force?: boolean | undefined;
}

/** What the jobs need of the engine and the daemon around it (the real ones satisfy it). */
export interface JobsEngine extends BackupEngine {
  deviceSizeBytes(name: string): number;
  /** Who uses the device now (NBD clients, loop devices over its FUSE file), one phrase each. */
  deviceUsers(name: string): Promise<string[]>;
}

export interface BackupJobView {
  readonly id: string;
  readonly kind: "backup" | "restore";
  readonly device: string;
  readonly repository: string;
  readonly state: "running" | "done" | "failed" | "cancelled";
  /** A cancel was asked for; the job ends `cancelled` at its next chunk boundary (or as it would have). */
  readonly cancelRequested: boolean;
  /** The caller's snapshot the job reads, or null for its own (created, taken and destroyed). */
  readonly snapshotId: string | null;
  readonly startedAt: string;
  readonly finishedAt: string | null;
  readonly progress: BackupProgress;
  /** The level chosen and why (e.g. "incremental since backup …", "full backup: CBT generation changed …"). */
  readonly levelReason: string | null;
  readonly backupId: string | null;
  readonly result: {
    readonly level: "full" | "inc";
    readonly readBytes: number;
    readonly newChunks: number;
    readonly newBytesStored: number;
  } | null;
  /** A restore's outcome (backups: null). */
  readonly restored: { readonly bytesWritten: number; readonly chunksRead: number } | null;
  readonly error: { readonly errno: string; readonly message: string } | null;
}

interface Job {
  view: BackupJobView;
  readonly abort: AbortController;
}

const jobIdPrefixCharsMin = 4;

export class BackupJobs {
  private readonly engine: JobsEngine;
  private readonly logger: Logger;
  private readonly jobs = new Map<string, Job>();
  /** What the jobs did, for `GET /v1/backups/events` (each event is also logged). */
  readonly events: BackupJobEvents;

  constructor(engine: JobsEngine, logger: Logger) {
    this.engine = engine;
    this.logger = logger;
    this.events = new BackupJobEvents(logger);
  }

  /** Wakes every reader waiting for an event (the daemon stops). */
  close(): void {
    this.events.close();
  }

  start(request: BackupRequest): BackupJobView {
    const sizeBytes = this.engine.deviceSizeBytes(request.device);
    this.checkNoJobOn(request.device);
    const job = this.newJob("backup", request.device, request.repository, request.snapshotId ?? null);
    void this.run(job, request, sizeBytes);
    return job.view;
  }

  /** Checks, then starts a restore job; a refusal (no backup, too small, in use) is the answer. */
  async startRestore(request: RestoreRequest): Promise<BackupJobView> {
    const sizeBytes = this.engine.deviceSizeBytes(request.device);
    this.checkNoJobOn(request.device);
    const users = await this.engine.deviceUsers(request.device);
    if (users.length > 0 && request.force !== true)
      throw new BlockError(
        "EBUSY",
        `Device ${request.device} is in use (${users.join("; ")}): stop its users first, or restore with --force`,
      );
    const repository = await this.openRepository(request);
    let manifest: Manifest;
    try {
      manifest = await repository.readManifest(await repository.resolve(request.backup));
      if (manifest.sizeBytes > sizeBytes)
        throw new BlockError(
          "ENOSPC",
          `Device ${request.device} (${sizeBytes} bytes) is smaller than backup ${manifest.device}/${manifest.id} (${manifest.sizeBytes} bytes)`,
        );
      this.checkNoJobOn(request.device);
    } catch (error) {
      await repository.close().catch(() => {});
      throw error;
    }
    if (users.length > 0)
      this.logger.warn({ device: request.device, users }, "restoring onto a device in use");
    const job = this.newJob("restore", request.device, request.repository, null);
    job.view = { ...job.view, backupId: manifest.id };
    this.emitStarted(job, null, `restore of backup ${manifest.device}/${manifest.id}`);
    void this.runRestore(job, repository, manifest);
    return job.view;
  }

  private checkNoJobOn(device: string): void {
    for (const job of this.jobs.values()) {
      if (job.view.device === device && job.view.state === "running") {
        throw new BlockError(
          "EBUSY",
          `A ${job.view.kind} of ${device} is already running (job ${job.view.id})`,
        );
      }
    }
  }

  private async openRepository(request: {
    repository: string;
    keyFile?: string | undefined;
    s3?: S3Settings | undefined;
  }): Promise<Repository> {
    const key = request.keyFile === undefined ? null : await readKeyFile(request.keyFile);
    return await Repository.open(Repository.storeFor(request.repository, request.s3 ?? {}), { key });
  }

  private newJob(
    kind: BackupJobView["kind"],
    device: string,
    repository: string,
    snapshotId: string | null,
  ): Job {
    const job: Job = {
      view: {
        id: randomUUID(),
        kind,
        device,
        repository,
        state: "running",
        cancelRequested: false,
        snapshotId,
        startedAt: new Date().toISOString(),
        finishedAt: null,
        progress: { phase: "snapshot", totalBytes: 0, doneBytes: 0, newBytesStored: 0 },
        levelReason: null,
        backupId: null,
        result: null,
        restored: null,
        error: null,
      },
      abort: new AbortController(),
    };
    this.jobs.set(job.view.id, job);
    this.forgetOldJobs();
    return job;
  }

  get(id: string): BackupJobView {
    return this.find(id).view;
  }

  /** Asks a running job to stop; a job already cancelled answers as it is, one that ended otherwise EALREADY. */
  cancel(id: string): BackupJobView {
    const job = this.find(id);
    if (job.view.state === "running") {
      job.view = { ...job.view, cancelRequested: true };
      job.abort.abort();
    } else if (job.view.state !== "cancelled") {
      throw new BlockError("EALREADY", `Backup job ${job.view.id} already ended (${job.view.state})`);
    }
    return job.view;
  }

  private find(id: string): Job {
    const exact = this.jobs.get(id);
    if (exact !== undefined) return exact;
    const matches =
      id.length < jobIdPrefixCharsMin
        ? []
        : [...this.jobs.values()].filter((job) => job.view.id.startsWith(id));
    if (matches.length > 1) throw new BlockError("EINVAL", `Backup job id prefix ${id} is ambiguous`);
    const [job] = matches;
    if (job === undefined) throw new BlockError("ENOENT", `No backup job ${id}`);
    return job;
  }

  list(): BackupJobView[] {
    return [...this.jobs.values()].map((job) => job.view);
  }

  private async run(job: Job, request: BackupRequest, sizeBytes: number): Promise<void> {
    let repository: Repository | null = null;
    try {
      repository = await this.openRepository(request);
      const outcome = await runBackup({
        engine: this.engine,
        repository,
        device: request.device,
        level: request.level,
        snapshotId: request.snapshotId ?? null,
        signal: job.abort.signal,
        storage: request.storage ?? tmpdir(),
        storageLimitBytes: request.limitBytes ?? Math.max(snapshotLimitBytesMin, Math.ceil(sizeBytes / 4)),
        onProgress: (progress) => {
          job.view = { ...job.view, progress };
        },
        onNote: (note, level) => {
          job.view = { ...job.view, levelReason: note };
          this.emitStarted(job, level, note);
        },
      });
      const { manifest } = outcome;
      job.view = {
        ...job.view,
        state: "done",
        finishedAt: new Date().toISOString(),
        backupId: manifest.id,
        levelReason: outcome.levelReason,
        result: {
          level: manifest.level,
          readBytes: manifest.readBytes,
          newChunks: manifest.newChunks,
          newBytesStored: manifest.newBytesStored,
        },
      };
      this.events.emit({
        ...this.eventBase(job),
        type: "finished",
        backup: `${manifest.device}/${manifest.id}`,
        level: manifest.level,
        bytes: manifest.readBytes,
        newBytesStored: manifest.newBytesStored,
        durationMs: this.durationMs(job),
      });
    } catch (error) {
      this.fail(job, error);
    } finally {
      await repository?.close().catch(() => {});
    }
  }

  private async runRestore(job: Job, repository: Repository, manifest: Manifest): Promise<void> {
    try {
      const target = this.engine.findExport(job.view.device);
      if (target === undefined) throw new BlockError("ENOENT", `Device ${job.view.device} is gone`);
      const restored = await restoreToDevice(repository, manifest, target.device, {
        signal: job.abort.signal,
        onProgress: ({ totalBytes, doneBytes }) => {
          job.view = {
            ...job.view,
            progress: { phase: "reading", totalBytes, doneBytes, newBytesStored: 0 },
          };
        },
      });
      job.view = {
        ...job.view,
        state: "done",
        finishedAt: new Date().toISOString(),
        progress: { ...job.view.progress, phase: "done" },
        restored,
      };
      this.events.emit({
        ...this.eventBase(job),
        type: "finished",
        backup: `${manifest.device}/${manifest.id}`,
        level: null,
        bytes: restored.bytesWritten,
        newBytesStored: 0,
        durationMs: this.durationMs(job),
      });
    } catch (error) {
      this.fail(job, error);
    } finally {
      await repository.close().catch(() => {});
    }
  }

  private fail(job: Job, error: unknown): void {
    const { device, kind } = job.view;
    let blockError = toBlockError(error, `${kind} of ${device}`);
    const cancelled = job.abort.signal.aborted && blockError.errno === "ECANCELED";
    if (kind === "backup" && (blockError.errno === "ENOSPC" || blockError.errno === "EDQUOT"))
      // Still one line: what filled, and that nothing half-written is left to worry about.
      blockError = new BlockError(
        blockError.errno,
        `${blockError.message}: no backup of ${device} was written; free space (backup prune), then back up again`,
      );
    job.view = {
      ...job.view,
      state: cancelled ? "cancelled" : "failed",
      finishedAt: new Date().toISOString(),
      error: { errno: blockError.errno, message: blockError.message },
    };
    const durationMs = this.durationMs(job);
    if (cancelled) this.events.emit({ ...this.eventBase(job), type: "cancelled", durationMs });
    else
      this.events.emit({
        ...this.eventBase(job),
        type: "failed",
        errno: blockError.errno,
        message: blockError.message,
        durationMs,
      });
  }

  private emitStarted(job: Job, level: "full" | "inc" | null, reason: string): void {
    this.events.emit({ ...this.eventBase(job), type: "started", level, reason });
  }

  private eventBase(job: Job) {
    const { id, kind, device, repository } = job.view;
    return { job: id, kind, device, repository };
  }

  /** From the job's start to its end (or now, while it runs). */
  private durationMs(job: Job): number {
    const endMs = job.view.finishedAt === null ? Date.now() : Date.parse(job.view.finishedAt);
    return Math.max(0, endMs - Date.parse(job.view.startedAt));
  }

  private forgetOldJobs(): void {
    for (const [id, job] of this.jobs) {
      if (this.jobs.size <= jobsKeptMax) break;
      if (job.view.state !== "running") this.jobs.delete(id);
    }
  }
}

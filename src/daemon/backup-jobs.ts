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
 * happens. An s3:// repository takes its credentials from the daemon's own environment or shared
 * credentials file (s3-credentials.ts), never from the request. Not done yet: cancelling a job, jobs that survive a daemon restart (an interrupted backup leaves
 * only unreferenced chunks; run it again).
 */
import { randomUUID } from "node:crypto";
import { tmpdir } from "node:os";
import { type BackupEngine, type BackupLevel, type BackupProgress, runBackup } from "../backup/backup-run.js";
import { Repository } from "../backup/repository.js";
import { readKeyFile } from "../backup/repository-key.js";
import type { S3Settings } from "../backup/s3-store.js";
import { BlockError, toBlockError } from "../block/errors.js";
import type { Logger } from "../util/logger.js";

const jobsKeptMax = 32;
const snapshotLimitBytesMin = 64 * 1024 * 1024;

export interface BackupRequest {
  readonly device: string;
  readonly repository: string;
  readonly level: BackupLevel;
  readonly keyFile?: string | undefined;
  readonly storage?: string | undefined;
  readonly limitBytes?: number | undefined;
  /** Endpoint, region and parallelism of an s3:// repository (credentials: the daemon's environment). */
  readonly s3?: S3Settings | undefined;
}

export interface BackupJobView {
  readonly id: string;
  readonly device: string;
  readonly repository: string;
  readonly state: "running" | "done" | "failed";
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
  readonly error: { readonly errno: string; readonly message: string } | null;
}

interface Job {
  view: BackupJobView;
}

export class BackupJobs {
  private readonly engine: BackupEngine & { deviceSizeBytes(name: string): number };
  private readonly logger: Logger;
  private readonly jobs = new Map<string, Job>();

  constructor(engine: BackupEngine & { deviceSizeBytes(name: string): number }, logger: Logger) {
    this.engine = engine;
    this.logger = logger;
  }

  start(request: BackupRequest): BackupJobView {
    const sizeBytes = this.engine.deviceSizeBytes(request.device);
    for (const job of this.jobs.values()) {
      if (job.view.device === request.device && job.view.state === "running") {
        throw new BlockError(
          "EBUSY",
          `A backup of ${request.device} is already running (job ${job.view.id})`,
        );
      }
    }
    const job: Job = {
      view: {
        id: randomUUID(),
        device: request.device,
        repository: request.repository,
        state: "running",
        startedAt: new Date().toISOString(),
        finishedAt: null,
        progress: { phase: "snapshot", totalBytes: 0, doneBytes: 0, newBytesStored: 0 },
        levelReason: null,
        backupId: null,
        result: null,
        error: null,
      },
    };
    this.jobs.set(job.view.id, job);
    this.forgetOldJobs();
    void this.run(job, request, sizeBytes);
    return job.view;
  }

  get(id: string): BackupJobView {
    const job = this.jobs.get(id);
    if (!job) throw new BlockError("ENOENT", `No backup job ${id}`);
    return job.view;
  }

  list(): BackupJobView[] {
    return [...this.jobs.values()].map((job) => job.view);
  }

  private async run(job: Job, request: BackupRequest, sizeBytes: number): Promise<void> {
    let repository: Repository | null = null;
    try {
      const key = request.keyFile === undefined ? null : await readKeyFile(request.keyFile);
      repository = await Repository.open(Repository.storeFor(request.repository, request.s3 ?? {}), { key });
      const outcome = await runBackup({
        engine: this.engine,
        repository,
        device: request.device,
        level: request.level,
        storage: request.storage ?? tmpdir(),
        storageLimitBytes: request.limitBytes ?? Math.max(snapshotLimitBytesMin, Math.ceil(sizeBytes / 4)),
        onProgress: (progress) => {
          job.view = { ...job.view, progress };
        },
        onNote: (note) => {
          job.view = { ...job.view, levelReason: note };
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
      this.logger.info(
        { device: request.device, backup: manifest.id, level: manifest.level, readBytes: manifest.readBytes },
        "backup done",
      );
    } catch (error) {
      const blockError = toBlockError(error, `backup of ${request.device}`);
      job.view = {
        ...job.view,
        state: "failed",
        finishedAt: new Date().toISOString(),
        error: { errno: blockError.errno, message: blockError.message },
      };
      this.logger.error({ device: request.device, err: blockError.message }, "backup failed");
    } finally {
      await repository?.close().catch(() => {});
    }
  }

  private forgetOldJobs(): void {
    for (const [id, job] of this.jobs) {
      if (this.jobs.size <= jobsKeptMax) break;
      if (job.view.state !== "running") this.jobs.delete(id);
    }
  }
}

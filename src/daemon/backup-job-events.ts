/**
 * The daemon's backup job events (issue 13, "long jobs … events"): one daemon-wide log of what backup and
 * restore jobs did, so a user follows them from a cursor without polling (`GET /v1/backups/events?since=N
 * &timeoutMs=T`, `blocksnap backup events --since N --follow`). It is the engine's EventLog (bounded,
 * sequence-numbered, any number of readers each with its own cursor; `missed` counts what the bound dropped)
 * holding these events instead of a snapshot's; every event is also written to the daemon's log.
 *
 * A job emits, in this order: `started` once its level is chosen (a backup: after its snapshot is taken;
 * a restore: at once) — a job that fails or is cancelled before that emits only its end — then exactly one
 * of `finished`, `failed` (with the error) or `cancelled`. Not done: the log lives in memory, so a cursor
 * from before a daemon restart is refused (EINVAL), as a snapshot's is.
 */
import { EventLog } from "../engine/event-log.js";
import type { Logger } from "../util/logger.js";

/** Events kept: the newest ones; older ones are dropped (and counted as `missed` by a reader behind). */
export const jobEventsKeptMax = 1024;

interface JobEventBase {
  readonly timeMs: number;
  readonly job: string;
  readonly kind: "backup" | "restore";
  readonly device: string;
  readonly repository: string;
}

export type BackupJobEvent =
  | (JobEventBase & {
      readonly type: "started";
      /** A backup's level chosen; null for a restore. */
      readonly level: "full" | "inc" | null;
      /** Why that level (a backup), or which backup is written (a restore). */
      readonly reason: string;
    })
  | (JobEventBase & {
      readonly type: "finished";
      /** DEVICE/ID of the backup written (a backup) or read (a restore). */
      readonly backup: string;
      readonly level: "full" | "inc" | null;
      /** Bytes read from the image (a backup) or written to the device (a restore). */
      readonly bytes: number;
      /** Bytes of new chunks the repository stored (0 for a restore). */
      readonly newBytesStored: number;
      readonly durationMs: number;
    })
  | (JobEventBase & {
      readonly type: "failed";
      readonly errno: string;
      readonly message: string;
      readonly durationMs: number;
    })
  | (JobEventBase & { readonly type: "cancelled"; readonly durationMs: number });

/** Distributes `Omit` over the union, so each event type keeps its own fields. */
type WithoutTime<T> = T extends unknown ? Omit<T, "timeMs"> : never;

export class BackupJobEvents {
  readonly log = new EventLog<BackupJobEvent>(jobEventsKeptMax, "the backup job events");
  private readonly logger: Logger;

  constructor(logger: Logger) {
    this.logger = logger;
  }

  emit(event: WithoutTime<BackupJobEvent>): void {
    const timed = { ...event, timeMs: Date.now() } as BackupJobEvent;
    const seq = this.log.push(timed);
    // The log line's own `level` and `time` are the logger's: the job's level is `backupLevel` there.
    const { type, kind, timeMs: _timeMs, ...fields } = timed;
    const { level, ...rest } = fields as typeof fields & { level?: string | null };
    const line = { seq, ...rest, ...(level === undefined ? {} : { backupLevel: level }) };
    if (type === "failed") this.logger.error(line, `${kind} job failed`);
    else this.logger.info(line, `${kind} job ${type}`);
  }

  close(): void {
    this.log.close();
  }
}

/**
 * Following a daemon backup job from the CLI until it ends (`backup create` without --detach). It polls
 * GET /v1/backups/jobs/:id every followPollMs (so at most 4 updates a second) and shows progress:
 *  - on a terminal (stderr is a TTY, no --json): one line redrawn in place — bytes done of the total, the
 *    percentage, MiB/s since reading began and the ETA — cleared when the job ends;
 *  - with --json: one JSON line `{"progress": {...}}` on stdout per poll whose progress changed; the caller
 *    then prints the result as one more line;
 *  - otherwise nothing until the end.
 * Ctrl-C (SIGINT) stops following, not the job: the job runs on in the daemon and the message says how to
 * follow (`backup status JOB`) or cancel it; the exit code is 130 as for any interrupted command.
 */
import type { BackupJobView } from "../daemon/backup-jobs.js";
import type { ControlClient } from "./control-client.js";
import { writeJsonLine } from "./output.js";
import { formatSize } from "./units.js";

export const followPollMs = 250;
const exitCodeInterrupted = 130;
const MiB = 1024 * 1024;

export interface JobRate {
  readonly bytesPerSecond: number | null;
  readonly etaSeconds: number | null;
}

/** Rate and ETA from the first sample of the reading phase to the latest one. */
export class RateMeter {
  private start: { atMs: number; doneBytes: number } | null = null;

  sample(view: BackupJobView, nowMs: number): JobRate {
    const { phase, doneBytes, totalBytes } = view.progress;
    if (phase !== "reading") return { bytesPerSecond: null, etaSeconds: phase === "snapshot" ? null : 0 };
    if (this.start === null) this.start = { atMs: nowMs, doneBytes };
    const elapsedMs = nowMs - this.start.atMs;
    const movedBytes = doneBytes - this.start.doneBytes;
    if (elapsedMs <= 0 || movedBytes <= 0) return { bytesPerSecond: null, etaSeconds: null };
    const bytesPerSecond = (movedBytes * 1000) / elapsedMs;
    return { bytesPerSecond, etaSeconds: Math.max(0, (totalBytes - doneBytes) / bytesPerSecond) };
  }
}

/** The terminal's progress line: "reading 1.2G of 4.0G  30%  250.3 MiB/s  ETA 0:12". */
export function progressLine(view: BackupJobView, rate: JobRate): string {
  const { phase, doneBytes, totalBytes } = view.progress;
  const what = `${view.kind} ${view.device}`;
  if (phase === "snapshot") return `${what}: taking a snapshot…`;
  if (phase === "manifest" || phase === "done")
    return `${what}: ${view.kind === "backup" ? "writing the manifest" : "flushing"}…`;
  const percent = totalBytes === 0 ? 100 : Math.floor((doneBytes * 100) / totalBytes);
  const speed = rate.bytesPerSecond === null ? "–" : `${(rate.bytesPerSecond / MiB).toFixed(1)} MiB/s`;
  const eta = rate.etaSeconds === null ? "–" : formatEta(rate.etaSeconds);
  return `${what}: ${formatSize(doneBytes)} of ${formatSize(totalBytes)}  ${percent}%  ${speed}  ETA ${eta}`;
}

function formatEta(seconds: number): string {
  const whole = Math.ceil(seconds);
  const hours = Math.floor(whole / 3600);
  const minutes = Math.floor((whole % 3600) / 60);
  const rest = String(whole % 60).padStart(2, "0");
  return hours > 0 ? `${hours}:${String(minutes).padStart(2, "0")}:${rest}` : `${minutes}:${rest}`;
}

/**
 * Polls the job until it leaves `running`; returns its final view, or null when the user pressed Ctrl-C
 * (after saying how to follow it; the exit code is set).
 */
export async function followJob(
  client: ControlClient,
  started: BackupJobView,
  options: { readonly json: boolean },
): Promise<BackupJobView | null> {
  const terminal = !options.json && process.stderr.isTTY === true;
  const meter = new RateMeter();
  let interrupted = false;
  let wake: (() => void) | null = null;
  const onInterrupt = () => {
    interrupted = true;
    wake?.();
  };
  process.on("SIGINT", onInterrupt);
  let lastProgress = "";
  let job = started;
  try {
    for (;;) {
      const rate = meter.sample(job, Date.now());
      if (options.json) {
        const progress = JSON.stringify(job.progress);
        if (progress !== lastProgress && job.state === "running") {
          lastProgress = progress;
          writeJsonLine({ progress: { job: job.id, device: job.device, ...job.progress, ...rate } });
        }
      } else if (terminal && job.state === "running") {
        process.stderr.write(`\r\x1b[K${progressLine(job, rate)}`);
      }
      if (job.state !== "running") break;
      await new Promise<void>((resolve) => {
        wake = resolve;
        setTimeout(resolve, followPollMs);
      });
      wake = null;
      if (interrupted) break;
      job = await client.get<BackupJobView>(`/v1/backups/jobs/${job.id}`);
    }
  } finally {
    process.off("SIGINT", onInterrupt);
    if (terminal) process.stderr.write("\r\x1b[K");
  }
  if (!interrupted) return job;
  process.stderr.write(
    `blocksnap: stopped following; backup job ${job.id} goes on in the daemon: follow it with \`blocksnap backup status ${job.id}\`, stop it with \`blocksnap backup cancel ${job.id}\`\n`,
  );
  process.exitCode = exitCodeInterrupted;
  return null;
}

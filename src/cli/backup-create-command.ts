/**
 * `blocksnap backup create --device NAME --repo REPO [--level …] [--snapshot ID]` (alias `run`, with the
 * device as an argument, as before): asks the daemon to back a device up (POST /v1/backups) and follows the
 * job (GET /v1/backups/jobs/:id) until it ends, with progress (backup-job-follow.ts); --detach returns at once
 * with the job id. Ctrl-C stops following, never the job. `backup status [JOB]` shows one job (or all the
 * daemon remembers) and `backup cancel JOB` stops one at its next chunk boundary and waits until it has
 * ended (its own snapshot destroyed, no manifest written). Without --snapshot the daemon creates, takes and destroys its
 * own snapshot; with it, the daemon reads that taken snapshot of the device and leaves it alone. The
 * repository's credentials (S3) are the daemon's own; the CLI sends only where the repository is.
 */
import { type Command, Option } from "commander";
import type { BackupJobView } from "../daemon/backup-jobs.js";
import { followJob } from "./backup-job-follow.js";
import {
  type RepositoryOptions,
  repositoryLocation,
  repositoryOptions,
  s3Settings,
} from "./backup-repository-options.js";
import { CliError, exitCodeFailure } from "./cli-error.js";
import { absolutePath, addCommonOptions, clientAction } from "./command-context.js";
import type { ControlClient } from "./control-client.js";
import { sizeArgument } from "./option-parsers.js";
import { formatFields, formatTable, writeJson, writeJsonLine, writeLine } from "./output.js";
import { formatSize } from "./units.js";

interface CreateOptions extends RepositoryOptions {
  readonly device?: string;
  readonly level: "full" | "inc" | "auto";
  readonly snapshot?: string;
  readonly storage?: string;
  readonly limit?: number;
  readonly detach?: boolean;
}

/** How long `backup cancel` waits for the job to end (a few chunks in flight finish first). */
const cancelWaitMs = 120_000;
const cancelPollMs = 100;

export function addBackupCreateCommand(backup: Command): void {
  addCreateCommand(backup);
  addStatusCommand(backup);
  addCancelCommand(backup);
}

function addCreateCommand(backup: Command): void {
  addCommonOptions(
    repositoryOptions(
      backup
        .command("create")
        .alias("run")
        .description(
          "back up a device: the daemon snapshots it and stores what changed since the last backup",
        )
        .argument("[device]", "the device to back up (or --device)")
        .option("--device <name>", "the device to back up")
        .addOption(
          new Option("--level <level>", "full, inc (fails when impossible) or auto")
            .choices(["full", "inc", "auto"])
            .default("auto"),
        )
        .option(
          "--snapshot <id>",
          "read this taken snapshot of the device (yours: it is not destroyed) instead of taking one",
        )
        .option(
          "--storage <path>",
          "difference storage of the backup's snapshot (default: the system's temporary directory)",
        )
        .option("--limit <size>", "its limit (default: a quarter of the device, at least 64M)", sizeArgument)
        .option("--detach", "return at once with the job id (follow it with backup status JOB)"),
    ),
  )
    .addHelpText(
      "after",
      "\nExamples:\n  $ blocksnap backup create --device disk0 --repo /srv/backups\n  $ blocksnap backup create --device disk0 --repo /srv/backups --snapshot 1f0c --level inc\n",
    )
    .action(
      clientAction<CreateOptions>(async ({ client, json }, [argument], options) => {
        const device = deviceOf(argument, options.device);
        if (options.snapshot !== undefined && (options.storage !== undefined || options.limit !== undefined))
          throw new CliError("--storage and --limit are for the backup's own snapshot, not with --snapshot", {
            errno: "EINVAL",
          });
        const started = await client.post<BackupJobView>("/v1/backups", {
          device,
          repository: repositoryLocation(options.repo),
          level: options.level,
          ...(options.repo.startsWith("s3://") ? { s3: s3Settings(options) } : {}),
          ...(options.key === undefined ? {} : { keyFile: absolutePath(options.key) }),
          ...(options.snapshot === undefined ? {} : { snapshotId: options.snapshot }),
          ...(options.storage === undefined ? {} : { storage: absolutePath(options.storage) }),
          ...(options.limit === undefined ? {} : { limitBytes: options.limit }),
        });
        if (options.detach) {
          if (json) return writeJson(started);
          return writeLine(`backup job ${started.id} started: blocksnap backup status ${started.id}`);
        }
        const job = await followJob(client, started, { json });
        if (job === null) return;
        if (job.state === "failed" || job.state === "cancelled") {
          const error = {
            errno: job.error?.errno ?? "EIO",
            message: job.error?.message ?? `backup ${job.state}`,
          };
          // After the progress lines, the error too is one line (the usual report would pretty-print it).
          if (json) {
            process.stderr.write(`blocksnap: ${error.message} (${error.errno})\n`);
            writeJsonLine({ error });
            process.exitCode = exitCodeFailure;
            return;
          }
          throw new CliError(error.message, { errno: error.errno });
        }
        if (json) return writeJsonLine(job);
        writeLine(`backup ${job.device}/${job.backupId}: ${job.levelReason}`);
        if (job.result) {
          writeLine(
            `read ${formatSize(job.result.readBytes)}, stored ${job.result.newChunks} new chunk(s), ${formatSize(job.result.newBytesStored)}`,
          );
        }
      }),
    );
}

function addStatusCommand(backup: Command): void {
  addCommonOptions(
    backup
      .command("status")
      .description("show a backup job of the daemon (or every job it remembers)")
      .argument("[job]", "the job id (or a unique prefix of at least 4 characters)"),
  )
    .addHelpText("after", "\nExample:\n  $ blocksnap backup status 3f2a\n")
    .action(
      clientAction(async ({ client, json }, [id]) => {
        if (id === undefined) {
          const { jobs } = await client.get<{ jobs: BackupJobView[] }>("/v1/backups/jobs");
          if (json) return writeJson({ jobs });
          const rows = jobs.map((job) => [job.id, job.device, job.state, progressText(job), job.startedAt]);
          for (const line of formatTable(["JOB", "DEVICE", "STATE", "PROGRESS", "STARTED"], rows))
            writeLine(line);
          return;
        }
        const job = await client.get<BackupJobView>(`/v1/backups/jobs/${encodeURIComponent(id)}`);
        if (json) return writeJson(job);
        printJob(job);
      }),
    );
}

function addCancelCommand(backup: Command): void {
  addCommonOptions(
    backup
      .command("cancel")
      .description(
        "stop a running backup job at its next chunk; no backup is written, its snapshot is destroyed",
      )
      .argument("<job>", "the job id (or a unique prefix of at least 4 characters)"),
  )
    .addHelpText("after", "\nExample:\n  $ blocksnap backup cancel 3f2a\n")
    .action(
      clientAction(async ({ client, json }, [id]) => {
        let job = await client.post<BackupJobView>(`/v1/backups/jobs/${encodeURIComponent(id!)}/cancel`, {});
        job = await waitUntilEnded(client, job);
        if (json) return writeJson(job);
        printJob(job);
        if (job.state === "running")
          throw new CliError(
            `backup job ${job.id} has not stopped yet; see blocksnap backup status ${job.id}`,
            {
              errno: "ETIMEDOUT",
            },
          );
      }),
    );
}

async function waitUntilEnded(client: ControlClient, started: BackupJobView): Promise<BackupJobView> {
  let job = started;
  const deadline = Date.now() + cancelWaitMs;
  while (job.state === "running" && Date.now() < deadline) {
    await new Promise((resolve) => setTimeout(resolve, cancelPollMs));
    job = await client.get<BackupJobView>(`/v1/backups/jobs/${job.id}`);
  }
  return job;
}

function progressText(job: BackupJobView): string {
  const { phase, doneBytes, totalBytes } = job.progress;
  if (job.state !== "running") return job.backupId ?? job.error?.message ?? "";
  if (phase !== "reading") return phase;
  return `${formatSize(doneBytes)} of ${formatSize(totalBytes)}`;
}

function printJob(job: BackupJobView): void {
  const fields: [string, string][] = [
    ["job", job.id],
    ["device", job.device],
    ["repository", job.repository],
    ["state", job.cancelRequested && job.state === "running" ? "running (cancel asked)" : job.state],
    ["phase", job.progress.phase],
    ["progress", `${formatSize(job.progress.doneBytes)} of ${formatSize(job.progress.totalBytes)}`],
    ["started", job.startedAt],
  ];
  if (job.finishedAt !== null) fields.push(["finished", job.finishedAt]);
  if (job.snapshotId !== null) fields.push(["snapshot", job.snapshotId]);
  if (job.levelReason !== null) fields.push(["level", job.levelReason]);
  if (job.backupId !== null) fields.push(["backup", `${job.device}/${job.backupId}`]);
  if (job.error !== null) fields.push(["error", `${job.error.message} (${job.error.errno})`]);
  for (const line of formatFields(fields)) writeLine(line);
}

/** The device from the argument or --device (one of them, or both the same). */
function deviceOf(argument: string | undefined, option: string | undefined): string {
  if (argument !== undefined && option !== undefined && argument !== option)
    throw new CliError(`two devices given: ${argument} and --device ${option}`, { errno: "EINVAL" });
  const device = argument ?? option;
  if (device === undefined) throw new CliError("say which device: --device NAME", { errno: "EINVAL" });
  return device;
}

/**
 * `blocksnap backup restore BACKUP --repo R --to PATH | --device NAME`. `--to` writes a file or a block
 * device from this process, without the daemon (restore.ts). `--device` asks the daemon to write the backup
 * onto one of its devices (POST /v1/backups/restores): refused while the device is in use — an NBD client
 * on it, a loop device over its FUSE file — unless `--force`, and when it is smaller than the backup; the
 * command follows the job like `backup create` (progress, --json lines, Ctrl-C stops following, --detach).
 * A file is restored under a hidden name beside it and renamed over the name asked for only once whole and
 * synced (the directory synced after), so a restore that fails — a damaged chunk, a full disk, Ctrl-C —
 * leaves no half image there, and an older file of that name stays as it was; a block device (or any
 * other existing non-file) is written in place.
 * `--to nbd+unix://…` is refused (ENOTSUP) with what to do instead: restore to a file and nbdcopy it, or
 * --device (there is no NBD client in src/ to write with).
 */
import { rename, rm, stat } from "node:fs/promises";
import { basename, dirname, join } from "node:path";
import type { Command } from "commander";
import type { Manifest } from "../backup/manifest.js";
import type { Repository } from "../backup/repository.js";
import { type RestoreOutcome, restoreToFile } from "../backup/restore.js";
import type { BackupJobView } from "../daemon/backup-jobs.js";
import { syncDirectory } from "../util/sync-directory.js";
import { followJob } from "./backup-job-follow.js";
import {
  openRepository,
  type RepositoryOptions,
  repositoryLocation,
  repositoryOptions,
  s3Settings,
} from "./backup-repository-options.js";
import { CliError, exitCodeFailure, exitCodeUsage } from "./cli-error.js";
import { absolutePath, addCommonOptions, localAction, resolveControlSocket } from "./command-context.js";
import { ControlClient } from "./control-client.js";
import { writeJson, writeJsonLine, writeLine } from "./output.js";
import { formatSize } from "./units.js";

interface RestoreOptions extends RepositoryOptions {
  readonly to?: string;
  readonly device?: string;
  readonly force?: boolean;
  readonly detach?: boolean;
}

export function addBackupRestoreCommand(backup: Command): void {
  addCommonOptions(
    repositoryOptions(
      backup
        .command("restore")
        .description(
          "write a backup (DEVICE/ID, an id, or DEVICE/latest) to a file or block device, or onto a blocksnap device",
        )
        .argument("<backup>", "which backup")
        .option("--to <path>", "a file (created or overwritten) or a block device at least as large")
        .option("--device <name>", "a blocksnap device at least as large (the daemon writes it)")
        .option("--force", "with --device: write even while the device is in use (its users see it change)")
        .option("--detach", "with --device: return at once with the job id"),
    ),
  )
    .addHelpText(
      "after",
      "\nExamples:\n  $ blocksnap backup restore disk0/latest --repo /srv/backups --to /tmp/disk0.img\n  $ blocksnap backup restore disk0/latest --repo /srv/backups --device disk0-copy\n",
    )
    .action(
      localAction<RestoreOptions>(async ([reference], options) => {
        if ((options.to === undefined) === (options.device === undefined))
          throw new CliError("say where to restore: --to PATH or --device NAME (one of them)", {
            exitCode: exitCodeUsage,
            errno: "EINVAL",
          });
        if (options.device !== undefined) return await restoreToDevice(reference!, options.device, options);
        if (/^nbds?(\+[a-z]+)?:\/\//.test(options.to!))
          throw new CliError(
            `restore writes no NBD URI: restore to a file and copy it (blocksnap backup restore ${reference} --repo ${options.repo} --to FILE, then nbdcopy FILE '${options.to}'), or onto a blocksnap device with --device NAME`,
            { errno: "ENOTSUP" },
          );
        const target = absolutePath(options.to!);
        const repository = await openRepository(options);
        try {
          const manifest = await repository.readManifest(await repository.resolve(reference!));
          const outcome = await restoreToPath(repository, manifest, target).catch((error: unknown) => {
            throw fullTargetError(error, target, `${manifest.device}/${manifest.id}`);
          });
          if (options.json) return writeJson({ backup: `${manifest.device}/${manifest.id}`, ...outcome });
          writeLine(
            `restored ${manifest.device}/${manifest.id} to ${target}: ${formatSize(outcome.bytesWritten)}, ${outcome.chunksRead} chunk(s) read`,
          );
        } finally {
          await repository.close();
        }
      }),
    );
}

async function restoreToPath(
  repository: Repository,
  manifest: Manifest,
  target: string,
): Promise<RestoreOutcome> {
  const existing = await stat(target).catch(() => null);
  if (existing !== null && !existing.isFile()) return await restoreToFile(repository, manifest, target);
  const partial = join(dirname(target), `.${basename(target)}.partial-${process.pid}`);
  try {
    const outcome = await restoreToFile(repository, manifest, partial);
    await rename(partial, target);
    await syncDirectory(dirname(target));
    return outcome;
  } catch (error) {
    await rm(partial, { force: true });
    throw error;
  }
}

/** A full file system (or quota) under --to is one line naming the target; other errors pass as they are. */
function fullTargetError(error: unknown, target: string, backup: string): unknown {
  const code = (error as NodeJS.ErrnoException | null)?.code;
  if (code !== "ENOSPC" && code !== "EDQUOT") return error;
  const why = code === "ENOSPC" ? "no space left on its file system" : "its quota is exceeded";
  return new CliError(
    `Cannot restore ${backup} to ${target}: ${why} (nothing left behind): free space or restore elsewhere`,
    { errno: code, cause: error },
  );
}

async function restoreToDevice(reference: string, device: string, options: RestoreOptions): Promise<void> {
  const json = options.json === true;
  const client = new ControlClient({ socketPath: resolveControlSocket(options) });
  const started = await client.post<BackupJobView>("/v1/backups/restores", {
    device,
    repository: repositoryLocation(options.repo),
    backup: reference,
    ...(options.repo.startsWith("s3://") ? { s3: s3Settings(options) } : {}),
    ...(options.key === undefined ? {} : { keyFile: absolutePath(options.key) }),
    ...(options.force === true ? { force: true } : {}),
  });
  if (options.detach) {
    if (json) return writeJson(started);
    return writeLine(`restore job ${started.id} started: blocksnap backup status ${started.id}`);
  }
  const job = await followJob(client, started, { json });
  if (job === null) return;
  if (job.state !== "done") {
    const error = { errno: job.error?.errno ?? "EIO", message: job.error?.message ?? `restore ${job.state}` };
    if (!json) throw new CliError(error.message, { errno: error.errno });
    process.stderr.write(`blocksnap: ${error.message} (${error.errno})\n`);
    writeJsonLine({ error });
    process.exitCode = exitCodeFailure;
    return;
  }
  if (json) return writeJsonLine(job);
  writeLine(
    `restored ${job.backupId} onto device ${job.device}: ${formatSize(job.restored?.bytesWritten ?? 0)}, ${job.restored?.chunksRead ?? 0} chunk(s) read`,
  );
}

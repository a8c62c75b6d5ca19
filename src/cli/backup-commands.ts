/**
 * `blocksnap backup …`: backups of devices into a repository of deduplicated, compressed (and optionally
 * encrypted) chunks (docs/backup-format.md). `create` (backup-create-command.ts) asks the daemon, which
 * takes its own snapshot, reads the image (only what CBT marks changed, for an incremental) and writes
 * chunks and a manifest. `init`, `key create`, `list`, `verify`, `restore`, `forget` and `prune` work on the
 * repository directly and need no daemon. A repository is a directory or `s3://BUCKET/PREFIX` (with
 * --s3-endpoint/--s3-region; credentials from the AWS variables or ~/.aws/credentials — for `create`, the
 * daemon's own, which the CLI never sends).
 */
import type { Command } from "commander";
import { collectGarbage, pruneBackups, pruneGraceMsDefault } from "../backup/prune.js";
import { Repository } from "../backup/repository.js";
import { createKeyFile, readKeyFile } from "../backup/repository-key.js";
import { verifyBackups } from "../backup/restore.js";
import { addBackupCreateCommand } from "./backup-create-command.js";
import { addBackupEventsCommand } from "./backup-events-command.js";
import { addBackupMountCommand, type MountOptions } from "./backup-mount-command.js";
import {
  openRepository,
  type RepositoryOptions,
  repositoryLocation,
  repositoryOptions,
  s3Options,
  s3Settings,
  storeOf,
} from "./backup-repository-options.js";
import { addBackupRestoreCommand } from "./backup-restore-command.js";
import { CliError } from "./cli-error.js";
import { absolutePath, addCommonOptions, type CommonOptions, localAction } from "./command-context.js";
import { countArgument, sizeArgument } from "./option-parsers.js";
import { formatTable, writeJson, writeLine } from "./output.js";
import { formatSize } from "./units.js";

export function addBackupCommands(program: Command): void {
  const backup = program
    .command("backup")
    .description("back up devices into a deduplicating repository, list, verify and restore backups")
    .addHelpText(
      "after",
      "\nExamples:\n  $ blocksnap backup init --repo /srv/backups\n  $ blocksnap backup create --device disk0 --repo /srv/backups\n  $ blocksnap backup restore disk0/latest --repo /srv/backups --to /tmp/disk0.img\n",
    );

  addCommonOptions(
    s3Options(
      backup
        .command("init")
        .description("create a backup repository in an empty or absent directory or S3 prefix")
        .requiredOption("--repo <repo>", "where to create it: a directory or s3://BUCKET/PREFIX")
        .option("--key <file>", "encrypt with this key file (make one with backup key create)")
        .option(
          "--chunk-size <size>",
          "chunk size, a power of two from 64K to 64M (default 4M)",
          sizeArgument,
        ),
    ),
  )
    .addHelpText("after", "\nExample:\n  $ blocksnap backup init --repo /srv/backups\n")
    .action(
      localAction<RepositoryOptions & { chunkSize?: number }>(async (_args, options) => {
        const key = options.key === undefined ? null : await readKeyFile(options.key);
        const repository = await Repository.init(storeOf(options), {
          key,
          ...(options.chunkSize === undefined ? {} : { chunkSizeBytes: options.chunkSize }),
        });
        await repository.close();
        if (options.json)
          return writeJson({ repository: repositoryLocation(options.repo), encrypted: key !== null });
        writeLine(
          `repository created: ${repositoryLocation(options.repo)}${key === null ? "" : " (encrypted)"}`,
        );
      }),
    );

  const key = backup.command("key").description("repository keys");
  addCommonOptions(
    key
      .command("create")
      .description(
        "write a new random key file (mode 0600); keep a copy elsewhere: without it the backups are lost",
      )
      .argument("<file>", "the key file to create"),
  )
    .addHelpText("after", "\nExample:\n  $ blocksnap backup key create /root/backup.key\n")
    .action(
      localAction<CommonOptions>(async ([file], options) => {
        await createKeyFile(absolutePath(file!));
        if (options.json) return writeJson({ keyFile: absolutePath(file!) });
        writeLine(`key written: ${absolutePath(file!)}`);
      }),
    );

  addBackupCreateCommand(backup);
  addBackupEventsCommand(backup);

  addCommonOptions(
    repositoryOptions(
      backup
        .command("list")
        .description("list the backups in a repository, oldest first")
        .option("--device <name>", "only this device's"),
    ),
  )
    .addHelpText("after", "\nExample:\n  $ blocksnap backup list --repo /srv/backups\n")
    .action(
      localAction<RepositoryOptions & { device?: string }>(async (_args, options) => {
        const repository = await openRepository(options);
        try {
          const manifests = [];
          for (const ref of await repository.listManifests(options.device)) {
            manifests.push(await repository.readManifest(ref));
          }
          if (options.json) {
            return writeJson({
              backups: manifests.map(({ chunks: _chunks, ...summary }) => summary),
            });
          }
          const rows = manifests.map((manifest) => [
            `${manifest.device}/${manifest.id}`,
            manifest.level,
            formatSize(manifest.sizeBytes),
            formatSize(manifest.readBytes),
            formatSize(manifest.newBytesStored),
            manifest.finishedAt,
          ]);
          for (const line of formatTable(["BACKUP", "LEVEL", "SIZE", "READ", "NEW", "FINISHED"], rows))
            writeLine(line);
        } finally {
          await repository.close();
        }
      }),
    );

  addCommonOptions(
    repositoryOptions(
      backup
        .command("verify")
        .description("read and check every chunk of one backup (DEVICE/ID, an id, DEVICE/latest) or of all")
        .argument("[backup]", "which backup (default: all)")
        .option(
          "--fast",
          "only check that every chunk is present (no download: finds deleted chunks, not damaged ones)",
        ),
    ),
  )
    .addHelpText("after", "\nExample:\n  $ blocksnap backup verify --repo /srv/backups\n")
    .action(
      localAction<RepositoryOptions & { fast?: boolean }>(async ([reference], options) => {
        const repository = await openRepository(options);
        try {
          const refs =
            reference === undefined
              ? await repository.listManifests()
              : [await repository.resolve(reference)];
          const manifests = [];
          for (const ref of refs) manifests.push(await repository.readManifest(ref));
          const problems = await verifyBackups(repository, manifests, { fast: options.fast === true });
          if (options.json) writeJson({ backups: manifests.length, problems });
          else {
            for (const problem of problems) writeLine(`${problem.backup}: ${problem.problem}`);
            writeLine(`${manifests.length} backup(s) verified, ${problems.length} problem(s)`);
          }
          if (problems.length > 0) process.exitCode = 1;
        } finally {
          await repository.close();
        }
      }),
    );

  addBackupRestoreCommand(backup);
  addCommonOptions(
    repositoryOptions(
      backup
        .command("forget")
        .description(
          "delete one backup (DEVICE/ID, an id, or DEVICE/latest); its chunks go at the next prune's garbage collection",
        )
        .argument("<backup>", "which backup"),
    ),
  )
    .addHelpText(
      "after",
      "\nExample:\n  $ blocksnap backup forget disk0/20261204T031200Z-3f2a1c --repo /srv/backups\n",
    )
    .action(
      localAction<RepositoryOptions>(async ([reference], options) => {
        const repository = await openRepository(options);
        try {
          const ref = await repository.resolve(reference!);
          await repository.deleteManifest(ref);
          if (options.json) return writeJson({ forgotten: `${ref.device}/${ref.id}` });
          writeLine(
            `forgot ${ref.device}/${ref.id}; chunks no other backup names go at the next prune (garbage collection)`,
          );
        } finally {
          await repository.close();
        }
      }),
    );
  addBackupMountCommand<RepositoryOptions & MountOptions>(
    backup,
    (command) => addCommonOptions(repositoryOptions(command)),
    openRepository,
    (options) => ({
      repository: repositoryLocation(options.repo),
      ...(options.repo.startsWith("s3://") ? { s3: s3Settings(options) } : {}),
      ...(options.key === undefined ? {} : { keyFile: absolutePath(options.key) }),
    }),
  );
  addCommonOptions(
    repositoryOptions(
      backup
        .command("prune")
        .description(
          "keep the newest backups of each device (last N, one a day, one a week), delete the others, then delete chunks no backup names",
        )
        .option(
          "--keep-last <n>",
          "newest backups to keep per device (default 1: the newest is always kept)",
          countArgument("--keep-last", 1_000_000),
        )
        .option(
          "--keep-daily <n>",
          "also keep the newest backup of each of the last N days that have backups (UTC)",
          countArgument("--keep-daily", 100_000),
        )
        .option(
          "--keep-weekly <n>",
          "also keep the newest backup of each of the last N ISO weeks that have backups",
          countArgument("--keep-weekly", 100_000),
        )
        .option(
          "--device <name>",
          "prune only this device's backups (garbage collection covers the repository)",
        )
        .option(
          "--grace-hours <n>",
          `keep unreferenced chunks younger than this, a running backup's (default ${pruneGraceMsDefault / 3_600_000})`,
          countArgument("--grace-hours", 100_000),
        )
        .option("--dry-run", "only say what would be deleted"),
    ),
  )
    .addHelpText(
      "after",
      "\nExamples:\n  $ blocksnap backup prune --repo /srv/backups --keep-last 7\n  $ blocksnap backup prune --repo /srv/backups --keep-daily 7 --keep-weekly 8\n",
    )
    .action(
      localAction<
        RepositoryOptions & {
          keepLast?: number;
          keepDaily?: number;
          keepWeekly?: number;
          device?: string;
          graceHours?: number;
          dryRun?: boolean;
        }
      >(async (_args, options) => {
        if (
          options.keepLast === undefined &&
          options.keepDaily === undefined &&
          options.keepWeekly === undefined
        )
          throw new CliError("say what to keep: --keep-last, --keep-daily and/or --keep-weekly", {
            errno: "EINVAL",
          });
        if (options.keepLast !== undefined && options.keepLast < 1)
          throw new CliError(
            "--keep-last must be at least 1 (the newest backup is the next incremental's base)",
            {
              errno: "EINVAL",
            },
          );
        const repository = await openRepository(options);
        try {
          const dryRun = options.dryRun === true;
          const pruned = await pruneBackups(repository, {
            keepLast: options.keepLast ?? 1,
            ...(options.keepDaily === undefined ? {} : { keepDaily: options.keepDaily }),
            ...(options.keepWeekly === undefined ? {} : { keepWeekly: options.keepWeekly }),
            dryRun,
            ...(options.device === undefined ? {} : { device: options.device }),
          });
          const garbage = await collectGarbage(repository, {
            dryRun,
            ...(options.graceHours === undefined ? {} : { graceMs: options.graceHours * 3_600_000 }),
          });
          if (options.json) return writeJson({ dryRun, ...pruned, ...garbage });
          const verb = dryRun ? "would remove" : "removed";
          for (const backupName of pruned.removed) writeLine(`${verb} ${backupName}`);
          writeLine(
            `${pruned.kept.length} backup(s) kept, ${pruned.removed.length} ${verb}; ${verb} ${garbage.removedChunks} chunk(s), ${formatSize(garbage.removedBytes)}; ${garbage.keptInGrace} unreferenced chunk(s) kept in the grace period`,
          );
        } finally {
          await repository.close();
        }
      }),
    );
}

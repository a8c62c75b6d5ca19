/**
 * `blocksnap backup mount BACKUP --repo R`: instant restore. Two ways:
 * - through the daemon (the default): the daemon serves the backup as the export `<device>@backup-<id>`
 *   on its NBD listeners and as a FUSE file (losetup turns it into a block device), read-only or, with
 *   `--overlay`, writable with the writes kept in a temporary file and discarded at `backup unmount`
 *   (src/daemon/backup-mounts.ts). `backup mounts` lists them.
 * - `--nbd-socket PATH`: this process serves it read-only over NBD on a Unix socket (mode 0600), in the
 *   foreground like qemu-nbd, until SIGINT or SIGTERM. It needs no daemon.
 * Chunks are decoded on demand (src/backup/backup-image.ts).
 */
import { chmod, rm } from "node:fs/promises";
import type { Command } from "commander";
import { BackupImage } from "../backup/backup-image.js";
import type { Repository } from "../backup/repository.js";
import type { S3Settings } from "../backup/s3-store.js";
import { CheckedDevice } from "../block/checked-device.js";
import { StaticExportSource } from "../block/export-source.js";
import { NbdServer } from "../nbd/nbd-server.js";
import { CliError } from "./cli-error.js";
import {
  absolutePath,
  addCommonOptions,
  type CommandContext,
  type CommonOptions,
  clientAction,
  localAction,
} from "./command-context.js";
import { writeJson, writeLine } from "./output.js";

export interface MountOptions extends CommonOptions {
  readonly nbdSocket?: string;
  readonly export?: string;
  readonly overlay?: boolean;
  readonly overlayDir?: string;
}

/** What the daemon needs to open the repository (the same options as the local commands). */
export interface RepositoryRequest {
  readonly repository: string;
  readonly keyFile?: string;
  readonly s3?: S3Settings;
}

/** What the daemon answers for a mounted backup (src/daemon/backup-mounts.ts, plus its addresses). */
interface MountedView {
  readonly name: string;
  readonly backup: string;
  readonly sizeBytes: number;
  readonly readOnly: boolean;
  readonly nbdUris: readonly string[];
  readonly fusePath: string | null;
}

/**
 * Adds `mount`, `unmount` and `mounts` under `backup`; `open` opens the repository from the shared
 * repository options, `request` names it for the daemon.
 */
export function addBackupMountCommand<Options extends MountOptions>(
  backup: Command,
  decorate: (command: Command) => Command,
  open: (options: Options) => Promise<Repository>,
  request: (options: Options) => RepositoryRequest,
): void {
  decorate(
    backup
      .command("mount")
      .description(
        "serve a backup as an export at once (instant restore): through the daemon, or --nbd-socket",
      )
      .argument("<backup>", "which backup (DEVICE/ID, an id, or DEVICE/latest)")
      .option(
        "--nbd-socket <path>",
        "serve it from this process instead, read-only, on this Unix socket (created mode 0600)",
      )
      .option("--export <name>", "with --nbd-socket: the export name (default: the device's name)")
      .option("--overlay", "writable: writes go to a temporary file, discarded at unmount (daemon only)")
      .option("--overlay-dir <dir>", "where that file lives (default: the daemon's temporary directory)"),
  )
    .addHelpText(
      "after",
      "\nExamples:\n  $ blocksnap backup mount disk0/latest --repo /srv/backups --overlay\n  $ losetup --find --show /run/blocksnap/fuse/disk0@backup-20261204T013012Z-1a2b3c\n  $ blocksnap backup mount disk0/latest --repo /srv/backups --nbd-socket /run/disk0-backup.sock &\n  $ qemu-img convert -O qcow2 'nbd+unix:///disk0?socket=/run/disk0-backup.sock' disk0.qcow2\n",
    )
    .action(async (...actionArgs: unknown[]) => {
      const command = actionArgs[actionArgs.length - 1] as Command;
      const options = command.opts<Options>();
      if (options.nbdSocket === undefined) {
        return clientAction<Options>((context, [reference], daemonOptions) =>
          mountThroughDaemon(context, reference!, { ...request(daemonOptions), ...overlayOf(daemonOptions) }),
        )(...actionArgs);
      }
      return localAction<Options>(async ([reference], localOptions) => {
        if (localOptions.overlay === true || localOptions.overlayDir !== undefined)
          throw new CliError("--overlay needs the daemon: leave out --nbd-socket", { errno: "EINVAL" });
        const nbdSocket = localOptions.nbdSocket;
        if (nbdSocket === undefined) throw new CliError("--nbd-socket is required here", { errno: "EINVAL" });
        await serveInForeground(await open(localOptions), reference!, { ...localOptions, nbdSocket });
      })(...actionArgs);
    });

  addCommonOptions(
    backup
      .command("unmount")
      .description("stop serving a backup mounted through the daemon (an overlay's writes are discarded)")
      .argument("<name>", "the export name `backup mount` printed (see `backup mounts`)"),
  )
    .addHelpText("after", "\nExample:\n  $ blocksnap backup unmount disk0@backup-20261204T013012Z-1a2b3c\n")
    .action(
      clientAction<CommonOptions>(async ({ client, json }, [name]) => {
        const answer = await client.delete<{ unmounted: string }>(
          `/v1/backups/mounts/${encodeURIComponent(name!)}`,
        );
        if (json) return writeJson(answer);
        writeLine(`unmounted ${answer.unmounted}`);
      }),
    );

  addCommonOptions(backup.command("mounts").description("list the backups the daemon serves"))
    .addHelpText("after", "\nExample:\n  $ blocksnap backup mounts\n")
    .action(
      clientAction<CommonOptions>(async ({ client, json }) => {
        const answer = await client.get<{ mounts: MountedView[] }>("/v1/backups/mounts");
        if (json) return writeJson(answer);
        if (answer.mounts.length === 0) return writeLine("no backups mounted");
        for (const mount of answer.mounts) printMounted(mount);
      }),
    );
}

function overlayOf(options: MountOptions): { overlay?: boolean; overlayDirectory?: string } {
  return {
    ...(options.overlay === true ? { overlay: true } : {}),
    ...(options.overlayDir === undefined ? {} : { overlayDirectory: absolutePath(options.overlayDir) }),
  };
}

async function mountThroughDaemon(
  { client, json }: CommandContext,
  reference: string,
  body: RepositoryRequest & { overlay?: boolean; overlayDirectory?: string },
): Promise<void> {
  const mounted = await client.post<MountedView>("/v1/backups/mounts", { ...body, backup: reference });
  if (json) return writeJson(mounted);
  printMounted(mounted);
}

function printMounted(mounted: MountedView): void {
  const mode = mounted.readOnly ? "read-only" : "writable overlay";
  writeLine(`${mounted.name}  (${mounted.backup}, ${mode})`);
  for (const uri of mounted.nbdUris) writeLine(`  nbd:   ${uri}`);
  if (mounted.fusePath !== null) writeLine(`  fuse:  ${mounted.fusePath}`);
}

/** The `--nbd-socket` way: this process serves the backup until SIGINT or SIGTERM. */
async function serveInForeground(
  repository: Repository,
  reference: string,
  options: MountOptions & { readonly nbdSocket: string },
): Promise<void> {
  const socketPath = absolutePath(options.nbdSocket);
  let server: NbdServer | null = null;
  // Listening from the start: a signal that comes while the server opens (a caller that stops it as soon
  // as the URI appears) still ends it through the clean-up below, not by Node's default action.
  let onSignal = (): void => {};
  const stopped = new Promise<void>((resolve) => {
    onSignal = () => resolve();
  });
  process.on("SIGINT", onSignal);
  process.on("SIGTERM", onSignal);
  try {
    const manifest = await repository.readManifest(await repository.resolve(reference));
    const exportName = options.export ?? manifest.device;
    const source = new StaticExportSource([
      {
        name: exportName,
        description: `backup ${manifest.device}/${manifest.id} (read-only)`,
        device: new CheckedDevice(new BackupImage(repository, manifest)),
        readOnly: true,
      },
    ]);
    server = new NbdServer(source);
    await server.listenUnix(socketPath);
    await chmod(socketPath, 0o600);
    const uri = `nbd+unix:///${encodeURIComponent(exportName)}?socket=${socketPath}`;
    if (options.json) writeJson({ backup: `${manifest.device}/${manifest.id}`, uri });
    else writeLine(`serving ${manifest.device}/${manifest.id} read-only at ${uri} (Ctrl-C to stop)`);
    await stopped;
  } finally {
    process.off("SIGINT", onSignal);
    process.off("SIGTERM", onSignal);
    await server?.close();
    await rm(socketPath, { force: true });
    await repository.close();
  }
}

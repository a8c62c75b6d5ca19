/**
 * `blocksnap backup mount BACKUP --repo R --nbd-socket PATH`: instant restore. Serves one backup read-only
 * over NBD on a Unix socket (mode 0600) from this process, in the foreground like qemu-nbd, until SIGINT or
 * SIGTERM: qemu-img, nbdcopy, nbd-client or nbdfuse read it without restoring it first. Chunks are decoded
 * on demand (src/backup/backup-image.ts); writes get EROFS. It needs no daemon.
 */
import { chmod, rm } from "node:fs/promises";
import type { Command } from "commander";
import { BackupImage } from "../backup/backup-image.js";
import type { Repository } from "../backup/repository.js";
import { CheckedDevice } from "../block/checked-device.js";
import { StaticExportSource } from "../block/export-source.js";
import { NbdServer } from "../nbd/nbd-server.js";
import { absolutePath, type CommonOptions, localAction } from "./command-context.js";
import { writeJson, writeLine } from "./output.js";

export interface MountOptions extends CommonOptions {
  readonly nbdSocket: string;
  readonly export?: string;
}

/** Adds `mount` under `backup`; `open` opens the repository from the shared repository options. */
export function addBackupMountCommand<Options extends MountOptions>(
  backup: Command,
  decorate: (command: Command) => Command,
  open: (options: Options) => Promise<Repository>,
): void {
  decorate(
    backup
      .command("mount")
      .description("serve a backup read-only over NBD on a Unix socket, in the foreground (instant restore)")
      .argument("<backup>", "which backup (DEVICE/ID, an id, or DEVICE/latest)")
      .requiredOption("--nbd-socket <path>", "the Unix socket to serve NBD on (created mode 0600)")
      .option("--export <name>", "the export name (default: the device's name)"),
  )
    .addHelpText(
      "after",
      "\nExample:\n  $ blocksnap backup mount disk0/latest --repo /srv/backups --nbd-socket /run/disk0-backup.sock &\n  $ qemu-img convert -O qcow2 'nbd+unix:///disk0?socket=/run/disk0-backup.sock' disk0.qcow2\n",
    )
    .action(
      localAction<Options>(async ([reference], options) => {
        const repository = await open(options);
        const socketPath = absolutePath(options.nbdSocket);
        let server: NbdServer | null = null;
        try {
          const manifest = await repository.readManifest(await repository.resolve(reference!));
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
          await new Promise<void>((resolve) => {
            process.once("SIGINT", resolve);
            process.once("SIGTERM", resolve);
          });
        } finally {
          await server?.close();
          await rm(socketPath, { force: true });
          await repository.close();
        }
      }),
    );
}

/**
 * Backups the daemon serves (instant restore through the daemon, issue 13): `POST /v1/backups/mounts` opens
 * a repository, and serves one backup as the export `<device>@backup-<id>` on every face the daemon has —
 * NBD (Unix socket, TCP with its TLS and access rules) and a FUSE file that `losetup` turns into a block
 * device — until `DELETE /v1/backups/mounts/:name`. The name cannot clash with the engine's exports (`@`
 * never appears in a device name, and snapshot ids are UUIDs).
 *
 * Read-only by default (BackupImage: chunks decoded on demand, writes EROFS). With `overlay`, writes go to
 * an anonymous temporary file (O_TMPFILE) in `overlayDirectory` (default: the system's temporary directory)
 * through an OverlayDevice, so a VM or a `mount` can run from the backup at once; the repository is never
 * written, and the overlay is gone when the mount ends or the daemon stops. At most mountsMax mounts.
 *
 * Locking: none beyond the event loop; a name is reserved before the repository opens, so two requests for
 * one backup cannot both mount it. Not done yet: mounts do not survive a daemon or engine restart (the
 * FUSE file and NBD export disappear; clients get EIO / a closed connection), and an unmount does not check
 * whether a loop device still holds the FUSE file (its reads then fail with EIO).
 */
import { tmpdir } from "node:os";
import { FileBackend } from "../backends/file-backend.js";
import { BackupImage } from "../backup/backup-image.js";
import { Repository } from "../backup/repository.js";
import { readKeyFile } from "../backup/repository-key.js";
import type { S3Settings } from "../backup/s3-store.js";
import { CheckedDevice } from "../block/checked-device.js";
import type { BlockDevice } from "../block/device.js";
import { BlockError } from "../block/errors.js";
import { StaticExportSource } from "../block/export-source.js";
import { OverlayDevice } from "../block/overlay-device.js";
import type { Logger } from "../util/logger.js";

const mountsMax = 16;

export interface BackupMountRequest {
  readonly repository: string;
  /** `DEVICE/ID`, an id, or `DEVICE/latest`. */
  readonly backup: string;
  readonly keyFile?: string | undefined;
  readonly s3?: S3Settings | undefined;
  readonly overlay?: boolean | undefined;
  readonly overlayDirectory?: string | undefined;
}

export interface BackupMountView {
  /** The export name on every face. */
  readonly name: string;
  readonly repository: string;
  readonly backup: string;
  readonly sizeBytes: number;
  readonly readOnly: boolean;
  readonly mountedAt: string;
}

interface Mount {
  readonly view: BackupMountView;
  readonly repository: Repository;
  readonly overlay: FileBackend | null;
}

export class BackupMounts {
  /** What the faces serve (merged with the engine's exports by the daemon). */
  readonly exports = new StaticExportSource();
  private readonly mounts = new Map<string, Mount>();
  /** Names being mounted: reserved before the repository opens. */
  private readonly opening = new Set<string>();
  private readonly logger: Logger;

  constructor(logger: Logger) {
    this.logger = logger;
  }

  list(): BackupMountView[] {
    return [...this.mounts.values()].map((mount) => mount.view);
  }

  get(name: string): BackupMountView {
    const mount = this.mounts.get(name);
    if (!mount) throw new BlockError("ENOENT", `No mounted backup ${name}`);
    return mount.view;
  }

  async mount(request: BackupMountRequest): Promise<BackupMountView> {
    if (this.mounts.size + this.opening.size >= mountsMax)
      throw new BlockError("ENOSPC", `At most ${mountsMax} backups can be mounted at once`);
    const key = request.keyFile === undefined ? null : await readKeyFile(request.keyFile);
    const repository = await Repository.open(Repository.storeFor(request.repository, request.s3 ?? {}), {
      key,
    });
    let reserved: string | null = null;
    let overlay: FileBackend | null = null;
    try {
      const manifest = await repository.readManifest(await repository.resolve(request.backup));
      const name = `${manifest.device}@backup-${manifest.id}`;
      if (this.mounts.has(name) || this.opening.has(name))
        throw new BlockError(
          "EEXIST",
          `Backup ${manifest.device}/${manifest.id} is already mounted as ${name}`,
        );
      this.opening.add(name);
      reserved = name;
      const image = new BackupImage(repository, manifest);
      let device: BlockDevice = image;
      if (request.overlay === true) {
        overlay = FileBackend.openAnonymous(request.overlayDirectory ?? tmpdir(), image.sizeBytes);
        device = new OverlayDevice(image, overlay);
      }
      const readOnly = request.overlay !== true;
      const view: BackupMountView = {
        name,
        repository: request.repository,
        backup: `${manifest.device}/${manifest.id}`,
        sizeBytes: manifest.sizeBytes,
        readOnly,
        mountedAt: new Date().toISOString(),
      };
      this.mounts.set(name, { view, repository, overlay });
      this.exports.add({
        name,
        description: `backup ${view.backup} (${readOnly ? "read-only" : "writable overlay, discarded at unmount"})`,
        device: new CheckedDevice(device),
        readOnly,
      });
      this.logger.info({ export: name, repository: request.repository, readOnly }, "backup mounted");
      return view;
    } catch (error) {
      await overlay?.close();
      await repository.close().catch(() => {});
      throw error;
    } finally {
      if (reserved !== null) this.opening.delete(reserved);
    }
  }

  async unmount(name: string): Promise<void> {
    const mount = this.mounts.get(name);
    if (!mount) throw new BlockError("ENOENT", `No mounted backup ${name}`);
    this.mounts.delete(name);
    // The faces drop the export first (open FUSE handles and NBD clients then get EIO), then it closes.
    this.exports.remove(name);
    await mount.overlay?.close();
    await mount.repository.close();
    this.logger.info({ export: name }, "backup unmounted");
  }

  async close(): Promise<void> {
    for (const name of [...this.mounts.keys()]) {
      try {
        await this.unmount(name);
      } catch (error) {
        this.logger.error({ export: name, err: String(error) }, "unmounting a backup at stop failed");
      }
    }
  }
}

/**
 * What the faces (NBD, FUSE) serve: named block devices that appear and disappear while the daemon runs.
 * The engine implements ExportSource; faces know nothing of snapshots. An export's device may start
 * failing every request with EIO (its snapshot was corrupted or destroyed) while a client still holds it:
 * faces keep answering with that error, they never hang.
 *
 * A snapshot image also says which of its blocks changed before its take (`changedBlocks`, blksnap's CBT
 * read map) in protocol-neutral terms; the NBD face names it (`qemu:dirty-bitmap:cbt…`, see
 * src/nbd/export-meta-contexts.ts). Faces see numbers and runs, never snapshots or maps.
 */
import type { BlockDevice } from "./device.js";

/** A run of bytes whose blocks all changed, or all did not. */
export interface ChangedRun {
  readonly lengthBytes: number;
  readonly changed: boolean;
}

/**
 * Which blocks of an image changed before its take, for incremental backup. Takes are numbered 1, 2, ...
 * within a CBT generation; a new generation (device attached, map reset, 255 takes, a restart whose state
 * could not be trusted) starts again at 1, and no take of an older generation can be a base.
 */
export interface ChangedBlocks {
  /** The CBT generation of this image's take (a UUID). */
  readonly generationId: string;
  /** This image's take number within its generation (blksnap's changes_number at take), at least 1. */
  readonly changesNumber: number;
  /**
   * The take number of the previous take of this device in the same generation, when the server made it
   * itself since it started; null when unknown (the first take of a generation, or the first since a
   * restart: a crash recovery also consumes a number, so changesNumber - 1 need not have been a take).
   */
  readonly previousChangesNumber: number | null;
  /**
   * Runs over [offsetBytes, offsetBytes + lengthBytes), from offsetBytes and in order, of the blocks
   * written after take `sinceChangesNumber` of the same generation (1 <= sinceChangesNumber <
   * changesNumber) and up to this image's take, or written through the image since. May cover less than
   * asked, never more; the range is already checked against the device size. BlockError EIO once the
   * image's snapshot is gone (a later take may have moved the map on).
   */
  changedRuns(
    sinceChangesNumber: number,
    offsetBytes: number,
    lengthBytes: number,
  ): Promise<readonly ChangedRun[]>;
}

export interface Export {
  /** Origin `<device>` or image `<device>@<snapshot-id>`. */
  readonly name: string;
  readonly description: string;
  /** Already wrapped in a CheckedDevice. */
  readonly device: BlockDevice;
  readonly readOnly: boolean;
  /** A snapshot image's changed blocks; absent on origins. */
  readonly changedBlocks?: ChangedBlocks;
}

export interface ExportSource {
  listExports(): readonly Export[];
  findExport(name: string): Export | undefined;
  /** Calls `listener` after exports were added or removed; returns the unsubscribe function. */
  onExportsChanged(listener: () => void): () => void;
}

/** A fixed or hand-edited set of exports: for tests and for serving devices without an engine. */
export class StaticExportSource implements ExportSource {
  private readonly exports = new Map<string, Export>();
  private readonly listeners = new Set<() => void>();

  constructor(exports: readonly Export[] = []) {
    for (const entry of exports) this.exports.set(entry.name, entry);
  }

  add(entry: Export): void {
    this.exports.set(entry.name, entry);
    this.notify();
  }

  remove(name: string): void {
    if (this.exports.delete(name)) this.notify();
  }

  listExports(): readonly Export[] {
    return [...this.exports.values()];
  }

  findExport(name: string): Export | undefined {
    return this.exports.get(name);
  }

  onExportsChanged(listener: () => void): () => void {
    this.listeners.add(listener);
    return () => this.listeners.delete(listener);
  }

  private notify(): void {
    for (const listener of this.listeners) listener();
  }
}

/**
 * Several sources served as one (the engine's devices and images, and the backups the daemon mounts).
 * A name is looked up in the sources in order, so an earlier source wins a clash; the owners of the later
 * sources refuse names the earlier ones hold when they add them.
 */
export class MergedExportSource implements ExportSource {
  private readonly sources: readonly ExportSource[];

  constructor(sources: readonly ExportSource[]) {
    this.sources = sources;
  }

  listExports(): readonly Export[] {
    return this.sources.flatMap((source) => source.listExports());
  }

  findExport(name: string): Export | undefined {
    for (const source of this.sources) {
      const found = source.findExport(name);
      if (found) return found;
    }
    return undefined;
  }

  onExportsChanged(listener: () => void): () => void {
    const unsubscribes = this.sources.map((source) => source.onExportsChanged(listener));
    return () => {
      for (const unsubscribe of unsubscribes) unsubscribe();
    };
  }
}

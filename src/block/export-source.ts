/**
 * What the faces (NBD, FUSE) serve: named block devices that appear and disappear while the daemon runs.
 * The engine implements ExportSource; faces know nothing of snapshots. An export's device may start
 * failing every request with EIO (its snapshot was corrupted or destroyed) while a client still holds it:
 * faces keep answering with that error, they never hang.
 *
 * An export may carry metadata contexts beyond what its device reports (NBD's `base:allocation` comes from
 * the device's extents): for example an image's CBT as `qemu:dirty-bitmap:cbt`. Faces see only names and
 * extents, never snapshots or maps.
 */
import type { BlockDevice } from "./device.js";

/** One run of a metadata context: `flags` as NBD defines them for that context. */
export interface MetaContextExtent {
  readonly lengthBytes: number;
  readonly flags: number;
}

export interface MetaContext {
  /** The full NBD context name, `namespace:leaf`, e.g. `qemu:dirty-bitmap:cbt`. */
  readonly name: string;
  /**
   * Runs covering [offsetBytes, offsetBytes + lengthBytes) from offsetBytes, in order; may cover less,
   * never more. The range is already checked against the device size. Errors are BlockErrors.
   */
  extents(offsetBytes: number, lengthBytes: number): Promise<readonly MetaContextExtent[]>;
}

export interface Export {
  /** Origin `<device>` or image `<device>@<snapshot-id>`. */
  readonly name: string;
  readonly description: string;
  /** Already wrapped in a CheckedDevice. */
  readonly device: BlockDevice;
  readonly readOnly: boolean;
  /** Extra metadata contexts (unique names, none named `base:allocation`); absent means none. */
  readonly metaContexts?: readonly MetaContext[];
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

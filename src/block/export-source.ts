/**
 * What the faces (NBD, FUSE) serve: named block devices that appear and disappear while the daemon runs.
 * The engine implements ExportSource; faces know nothing of snapshots. An export's device may start
 * failing every request with EIO (its snapshot was corrupted or destroyed) while a client still holds it:
 * faces keep answering with that error, they never hang.
 */
import type { BlockDevice } from "./device.js";

export interface Export {
  /** Origin `<device>` or image `<device>@<snapshot-id>`. */
  readonly name: string;
  readonly description: string;
  /** Already wrapped in a CheckedDevice. */
  readonly device: BlockDevice;
  readonly readOnly: boolean;
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

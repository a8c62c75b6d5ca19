/**
 * IoMetrics: the IoStats of every export, by export name, and their exposition. The engine asks for a
 * counting stage when it publishes an export (stage()); a scrape passes the names of the exports that
 * still exist (prune), so the counters of a destroyed image or a removed device go with it, and a device
 * added again under the same name starts from zero (Prometheus reads that as a counter reset).
 *
 * Labels: `device` (the origin's name), `snapshot` (the image's snapshot id; absent for an origin), `op`.
 * No locks: main thread only.
 */
import type { BlockDevice } from "../block/device.js";
import { CountingDevice } from "./counting-device.js";
import { IoStats, ioOps, latencyBucketsSeconds } from "./io-stats.js";
import type { Labels, TextWriter } from "./text-format.js";

/** What an export is, for its labels. */
export interface ExportIdentity {
  readonly exportName: string;
  readonly device: string;
  /** The snapshot of an image; null for an origin. */
  readonly snapshot: string | null;
}

interface Entry {
  readonly labels: Labels;
  readonly stats: IoStats;
}

export class IoMetrics {
  private readonly entries = new Map<string, Entry>();

  /** The counting stage over `device` for a newly published export. */
  stage(device: BlockDevice, identity: ExportIdentity): BlockDevice {
    const stats = new IoStats();
    const labels: Labels =
      identity.snapshot === null
        ? { device: identity.device }
        : { device: identity.device, snapshot: identity.snapshot };
    this.entries.set(identity.exportName, { labels, stats });
    return new CountingDevice(device, stats);
  }

  /** The stats of one export (tests, status); undefined when it was never published or was pruned. */
  statsOf(exportName: string): IoStats | undefined {
    return this.entries.get(exportName)?.stats;
  }

  /** Forgets every export not in `liveExportNames`. */
  prune(liveExportNames: ReadonlySet<string>): void {
    for (const name of this.entries.keys()) if (!liveExportNames.has(name)) this.entries.delete(name);
  }

  write(writer: TextWriter): void {
    const entries = [...this.entries.values()];
    const perOp = (read: (stats: IoStats, opIndex: number) => number) => {
      for (const { labels, stats } of entries) {
        for (const [opIndex, op] of ioOps.entries()) writer.sample({ ...labels, op }, read(stats, opIndex));
      }
    };
    writer.family("blocksnap_io_requests_total", "counter", "Requests served by an export, by operation.");
    perOp((stats, opIndex) => stats.requests[opIndex]!);
    writer.family(
      "blocksnap_io_bytes_total",
      "counter",
      "Bytes moved by successful requests of an export, by operation (trim and zero: bytes covered).",
    );
    perOp((stats, opIndex) => stats.bytes[opIndex]!);
    writer.family("blocksnap_io_errors_total", "counter", "Requests of an export that failed, by operation.");
    perOp((stats, opIndex) => stats.errors[opIndex]!);
    writer.family(
      "blocksnap_io_request_duration_seconds",
      "histogram",
      "Time from a request entering an export's stages to its completion, by operation.",
    );
    for (const { labels, stats } of entries) {
      for (const [opIndex, op] of ioOps.entries()) {
        writer.histogram(
          { ...labels, op },
          latencyBucketsSeconds,
          stats.cumulativeBuckets(opIndex),
          stats.latencySumSeconds[opIndex]!,
        );
      }
    }
  }
}

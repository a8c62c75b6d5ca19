/**
 * What the daemon's parts report to a metrics scrape (src/metrics/daemon-metrics.ts), read from them when
 * scraped: devices and their CBT from the engine, snapshots from their info (the numbers `status` shows),
 * the NBD face's connections. Read-only; nothing is counted here.
 */
import type { Engine } from "../engine/engine.js";
import type { FuseServer } from "../fuse/fuse-server.js";
import type { DeviceMetricsView, MetricsSources, SnapshotMetricsView } from "../metrics/daemon-metrics.js";
import type { EngineCounters } from "../metrics/engine-counters.js";
import type { IoMetrics } from "../metrics/io-metrics.js";
import type { NbdServer } from "../nbd/nbd-server.js";

export interface DaemonMetricsParts {
  readonly version: string;
  readonly engine: Engine;
  readonly io: IoMetrics;
  readonly counters: EngineCounters;
  readonly nbdServer: NbdServer | null;
  /** Read at each scrape: FUSE comes up after the metrics are wired. */
  readonly fuseServer: () => FuseServer | null;
}

export function daemonMetricsSources(parts: DaemonMetricsParts): MetricsSources {
  const { engine } = parts;
  return {
    version: parts.version,
    startTimeSeconds: Math.floor(performance.timeOrigin) / 1000,
    io: parts.io,
    counters: parts.counters,
    exportNames: () => engine.listExports().map((entry) => entry.name),
    devices: () =>
      engine.listDevices().map(
        (device): DeviceMetricsView => ({
          name: device.name,
          sizeBytes: device.sizeBytes,
          cbtBlockSizeBytes: device.cbt.blockSizeBytes,
          cbtBlockCount: device.cbt.blockCount,
          cbtDirtyBlocks: engine.tracker(device.name).cbt.dirtyBlockCount(),
        }),
      ),
    snapshots: () =>
      engine.listSnapshots().map(
        (info): SnapshotMetricsView => ({
          id: info.id,
          state: info.state,
          storageUsedBytes: info.storage.usedBytes,
          storageCapacityBytes: info.storage.capacityBytes,
          storageLimitBytes: info.storage.limitBytes,
          takeStallSeconds: info.takeStallMs === null ? null : info.takeStallMs / 1000,
          devices: info.devices.map((device) => ({
            name: device.name,
            chunksStored: device.chunksStored,
            chunksCopied: device.chunksCopied,
            copiedBytes: device.copiedBytes,
          })),
        }),
      ),
    nbd: () => {
      const server = parts.nbdServer;
      if (server === null) return null;
      return {
        connectionsOpen: server.connectionCount,
        connectionsAccepted: server.acceptedCount,
        connectionsRefused: server.refusedCount,
      };
    },
    fuse: () => {
      const stats = parts.fuseServer()?.requestStats;
      return stats === undefined ? null : { requestsHandled: stats.handled, requestsFailed: stats.failed };
    },
  };
}

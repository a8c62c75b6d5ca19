/**
 * The daemon's Prometheus metrics: one scrape renders what the daemon's parts report (MetricsSources, plain
 * data filled in by src/daemon/metrics-sources.ts) plus the I/O counters of the exports (IoMetrics). Names
 * follow Prometheus' conventions: `blocksnap_` prefix, base units in the name (`_bytes`, `_seconds`),
 * `_total` for counters; labels `device`, `snapshot`, `op`, `face`, `type`.
 *
 * Everything is read when scraped (no timers, nothing kept between scrapes besides counters the parts
 * own). A scrape costs a pass over the devices, snapshots and exports, and one scan of each CBT write map.
 * The list of metric names is in docs/metrics.md; a test (test/metrics/metrics-listen.test.ts) checks
 * that it names every family a scrape shows.
 */
import type { EngineCounters } from "./engine-counters.js";
import type { IoMetrics } from "./io-metrics.js";
import { type MetricType, TextWriter } from "./text-format.js";

export interface DeviceMetricsView {
  readonly name: string;
  readonly sizeBytes: number;
  readonly cbtBlockSizeBytes: number;
  readonly cbtBlockCount: number;
  /** Blocks written since the last take (CbtMap.dirtyBlockCount). */
  readonly cbtDirtyBlocks: number;
}

export interface SnapshotMetricsView {
  readonly id: string;
  readonly state: string;
  readonly storageUsedBytes: number;
  readonly storageCapacityBytes: number;
  readonly storageLimitBytes: number;
  /** Stall of this snapshot's take, seconds; null before take. */
  readonly takeStallSeconds: number | null;
  readonly devices: readonly {
    readonly name: string;
    readonly chunksStored: number;
    readonly chunksCopied: number;
    readonly copiedBytes: number;
  }[];
}

export interface MetricsSources {
  readonly version: string;
  /** When this process started, seconds since the epoch. */
  readonly startTimeSeconds: number;
  readonly io: IoMetrics;
  readonly counters: EngineCounters;
  /** Export names that exist now (the rest of IoMetrics is pruned at each scrape). */
  exportNames(): Iterable<string>;
  devices(): readonly DeviceMetricsView[];
  snapshots(): readonly SnapshotMetricsView[];
  /** The NBD face; null when it is off. */
  nbd(): {
    readonly connectionsOpen: number;
    readonly connectionsAccepted: number;
    readonly connectionsRefused: number;
  } | null;
  /** The FUSE face; null when it is off. */
  fuse(): { readonly requestsHandled: number; readonly requestsFailed: number } | null;
}

export function renderMetrics(sources: MetricsSources): string {
  const writer = new TextWriter();
  writeProcess(writer, sources);
  writeDevices(writer, sources.devices());
  sources.io.prune(new Set(sources.exportNames()));
  sources.io.write(writer);
  writeSnapshots(writer, sources.snapshots());
  sources.counters.write(writer);
  writeFaces(writer, sources);
  return writer.text();
}

function writeProcess(writer: TextWriter, sources: MetricsSources): void {
  writer
    .family("blocksnap_build_info", "gauge", "Always 1; the version of the running daemon.")
    .sample({ version: sources.version }, 1);
  writer
    .family("process_start_time_seconds", "gauge", "Start time of the process since the Unix epoch, seconds.")
    .sample({}, sources.startTimeSeconds);
  writer
    .family("process_resident_memory_bytes", "gauge", "Resident memory of the process, bytes.")
    .sample({}, process.memoryUsage.rss());
  const cpu = process.cpuUsage();
  writer
    .family("process_cpu_seconds_total", "counter", "User and system CPU time of the process, seconds.")
    .sample({}, (cpu.user + cpu.system) / 1e6);
}

function writeDevices(writer: TextWriter, devices: readonly DeviceMetricsView[]): void {
  writer.family("blocksnap_device_size_bytes", "gauge", "Size of an origin device, bytes.");
  for (const device of devices) writer.sample({ device: device.name }, device.sizeBytes);
  writer.family("blocksnap_cbt_block_size_bytes", "gauge", "CBT tracking block size of a device, bytes.");
  for (const device of devices) writer.sample({ device: device.name }, device.cbtBlockSizeBytes);
  writer.family("blocksnap_cbt_blocks", "gauge", "CBT tracking blocks of a device.");
  for (const device of devices) writer.sample({ device: device.name }, device.cbtBlockCount);
  writer.family(
    "blocksnap_cbt_dirty_blocks",
    "gauge",
    "CBT blocks of a device written since its last take (what the next take will report as changed).",
  );
  for (const device of devices) writer.sample({ device: device.name }, device.cbtDirtyBlocks);
}

function writeSnapshots(writer: TextWriter, snapshots: readonly SnapshotMetricsView[]): void {
  writer.family("blocksnap_snapshots", "gauge", "Snapshots by state.");
  const byState = new Map<string, number>([
    ["created", 0],
    ["taken", 0],
    ["corrupted", 0],
  ]);
  for (const snapshot of snapshots) byState.set(snapshot.state, (byState.get(snapshot.state) ?? 0) + 1);
  for (const [state, count] of byState) writer.sample({ state }, count);
  writer.family(
    "blocksnap_snapshot_storage_used_bytes",
    "gauge",
    "Difference storage of a snapshot in use by stored chunks, bytes.",
  );
  for (const snapshot of snapshots) writer.sample({ snapshot: snapshot.id }, snapshot.storageUsedBytes);
  writer.family(
    "blocksnap_snapshot_storage_capacity_bytes",
    "gauge",
    "Difference storage of a snapshot allocated so far (files grown, devices attached), bytes.",
  );
  for (const snapshot of snapshots) writer.sample({ snapshot: snapshot.id }, snapshot.storageCapacityBytes);
  writer.family(
    "blocksnap_snapshot_storage_limit_bytes",
    "gauge",
    "Limit of the difference storage of a snapshot, bytes.",
  );
  for (const snapshot of snapshots) writer.sample({ snapshot: snapshot.id }, snapshot.storageLimitBytes);
  writer.family(
    "blocksnap_snapshot_take_stall_seconds",
    "gauge",
    "How long new origin writes were held at the take of a snapshot, seconds (taken snapshots only).",
  );
  for (const snapshot of snapshots) {
    if (snapshot.takeStallSeconds !== null)
      writer.sample({ snapshot: snapshot.id }, snapshot.takeStallSeconds);
  }
  const perDevice = (
    name: string,
    type: MetricType,
    help: string,
    value: (device: SnapshotMetricsView["devices"][number]) => number,
  ): void => {
    writer.family(name, type, help);
    for (const snapshot of snapshots) {
      for (const device of snapshot.devices)
        writer.sample({ snapshot: snapshot.id, device: device.name }, value(device));
    }
  };
  perDevice(
    "blocksnap_snapshot_chunks_stored",
    "gauge",
    "Chunks of a device in a snapshot's difference storage (copied before write, or written through the image).",
    (device) => device.chunksStored,
  );
  perDevice(
    "blocksnap_cow_copies_total",
    "counter",
    "Chunks of a device copied into a snapshot's difference storage before an origin write overwrote them.",
    (device) => device.chunksCopied,
  );
  perDevice(
    "blocksnap_cow_copied_bytes_total",
    "counter",
    "Bytes of a device copied into a snapshot's difference storage before origin writes (since start).",
    (device) => device.copiedBytes,
  );
}

function writeFaces(writer: TextWriter, sources: MetricsSources): void {
  const nbd = sources.nbd();
  writer.family("blocksnap_nbd_connections", "gauge", "NBD connections open now.");
  if (nbd !== null) writer.sample({}, nbd.connectionsOpen);
  writer.family("blocksnap_nbd_connections_accepted_total", "counter", "NBD connections served since start.");
  if (nbd !== null) writer.sample({}, nbd.connectionsAccepted);
  writer.family(
    "blocksnap_nbd_connections_refused_total",
    "counter",
    "NBD connections closed at accept by a connection limit since start.",
  );
  if (nbd !== null) writer.sample({}, nbd.connectionsRefused);
  const fuse = sources.fuse();
  writer.family(
    "blocksnap_face_requests_total",
    "counter",
    "Requests a face received since start (FUSE: every kind, but not the READs its reader thread serves directly).",
  );
  if (fuse !== null) writer.sample({ face: "fuse" }, fuse.requestsHandled);
  writer.family("blocksnap_face_request_errors_total", "counter", "Requests a face answered with an error.");
  if (fuse !== null) writer.sample({ face: "fuse" }, fuse.requestsFailed);
}

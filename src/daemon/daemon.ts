/**
 * The blocksnap daemon: one Engine served through its faces (NBD on a Unix socket and on TCP, FUSE when
 * root) and driven through the control API on a Unix socket. Start order: state directory, lock, device
 * registry (devices re-attached), NBD, FUSE, control socket last (a client that can connect finds every
 * face ready). Stop order is the reverse: control socket (long polls end with ESHUTDOWN, in-flight
 * requests finish), NBD, FUSE (the faces stop before the engine they read from), the CBT states saved
 * (cbt-keeper.ts: exact maps, journals marked clean), engine.close() (closes snapshots, keeping them:
 * storage flushed, chunk logs sealed, snapshot-keeper.ts; flushes and closes backends), socket files, lock.
 * Start restores the kept snapshots right after the devices, before any face serves.
 *
 * Supervised (`supervised`: an EngineLink, src/supervisor/): the supervisor owns the listeners and the
 * /dev/fuse descriptor. Nothing listens here: the accepted sockets it passes go to the faces; FUSE is
 * mounted over the inherited descriptor, or the previous engine's session is resumed; the socket files
 * stay the supervisor's at stop. handOver() ends this engine for a planned restart without unmounting.
 *
 * A failure during start undoes what was started and is reported as a BlockError with a one-line message
 * (port in use, another daemon on the state directory, an explicit FUSE mount that failed).
 */

import { mkdir, rm } from "node:fs/promises";
import { join } from "node:path";
import { BlockError, toBlockError } from "../block/errors.js";
import { type ExportSource, MergedExportSource } from "../block/export-source.js";
import { Engine } from "../engine/engine.js";
import { LoopFreezer } from "../freeze/loop-freezer.js";
import { findLoopMountsUnder, type LoopMount } from "../freeze/mount-discovery.js";
import { cleanStaleMount, FuseServer } from "../fuse/fuse-server.js";
import { renderMetrics } from "../metrics/daemon-metrics.js";
import { EngineCounters } from "../metrics/engine-counters.js";
import { IoMetrics } from "../metrics/io-metrics.js";
import { MetricsListener } from "../metrics/metrics-listener.js";
import type { AccessPolicy } from "../nbd/access-rules.js";
import { NbdServer, type NbdServerOptions } from "../nbd/nbd-server.js";
import { loadNbdTls, type NbdTls, type TlsFiles } from "../nbd/tls.js";
import { assert } from "../util/assert.js";
import { loopDeviceUsersOver } from "../util/file-identity.js";
import { type Logger, type LogLevelControl, type LogLevelName, logLevelNames } from "../util/logger.js";
import { AccessFile } from "./access-file.js";
import type { AccessRulesView, AccessView, SnapshotRecoveryView, TlsView } from "./api-types.js";
import { BackupJobs } from "./backup-jobs.js";
import { BackupMounts } from "./backup-mounts.js";
import type { ControlContext } from "./control-routes.js";
import { ControlServer } from "./control-server.js";
import { DeviceRegistry } from "./device-registry.js";
import type { EngineLink } from "./engine-link.js";
import type { ExportAddresses } from "./export-urls.js";
import { daemonMetricsSources } from "./metrics-sources.js";
import { DaemonPathPolicy } from "./path-policy.js";
import { deviceRegistryPathIn, fuseSessionStatePathIn, lockFilePathIn } from "./paths.js";
import { SnapshotKeeper } from "./snapshot-keeper.js";
import {
  applyStateDirAccess,
  describeAccess,
  isLoopbackHost,
  listenRestricted,
  plaintextTcpWarning,
  type SocketAccess,
  socketMode,
} from "./socket-access.js";
import { removeStaleSocket } from "./stale-socket.js";
import { StateLock } from "./state-lock.js";
import { storageOnDevices } from "./storage-placement.js";

export interface DaemonOptions {
  readonly stateDir: string;
  readonly controlSocketPath: string;
  /** null: no NBD Unix socket. */
  readonly nbdSocketPath: string | null;
  /** null (the default): no NBD over TCP. Port 0 picks a free port (tests). */
  readonly nbdTcp: { readonly host: string; readonly port: number } | null;
  /** Plaintext TCP on a non-loopback address is refused unless this is set (or TLS is required). */
  readonly insecureNoTls?: boolean;
  /** NBD over TLS (serve --tls*); default off. */
  readonly tls?: TlsFiles;
  /** The NBD access rules file (serve --access); absent or null: every client may use every export. */
  readonly accessFile?: string | null;
  /** Who may use the Unix sockets; default: the daemon's user only. */
  readonly socketAccess?: SocketAccess;
  /** A listening NBD socket inherited through systemd socket activation (fd 3), served in addition. */
  readonly nbdActivationFd?: number | null;
  /** null: no FUSE. `required`: the mount was asked for explicitly, so failing to mount fails the start. */
  readonly fuse: { readonly mountDir: string; readonly required: boolean } | null;
  readonly version: string;
  readonly logger: Logger;
  /** The logger's level, changeable through the control API (POST /v1/log-level); absent: fixed. */
  readonly logLevel?: LogLevelControl;
  /** Set when this process is an engine under `serve --supervise`. */
  readonly supervised?: EngineLink;
  /**
   * Prometheus metrics over TCP (serve --metrics-listen; GET /metrics only, unauthenticated); null or
   * absent: none (the control socket's GET /metrics is always there). Port 0 picks a free port (tests).
   */
  readonly metricsTcp?: { readonly host: string; readonly port: number } | null;
  /** Bounds of the NBD face (serve --max-connections…); defaults in src/nbd/nbd-limits.ts. */
  readonly nbdLimits?: NbdLimitOptions;
}

export type NbdLimitOptions = Pick<
  NbdServerOptions,
  "connectionsMax" | "connectionsPerClientMax" | "inflightBudgetBytes"
>;

export class Daemon {
  readonly addresses: ExportAddresses;
  private readonly options: DaemonOptions;
  private readonly lock: StateLock;
  private readonly engine: Engine;
  private readonly registry: DeviceRegistry;
  private readonly nbdServer: NbdServer | null;
  private readonly fuseServer: FuseServer | null;
  private readonly backupMounts: BackupMounts;
  private readonly controlServer: ControlServer;
  private readonly shutdownController: AbortController;
  private readonly accessFile: AccessFile;
  private readonly metricsListener: MetricsListener | null;
  private stopping: Promise<void> | null = null;

  private constructor(parts: {
    options: DaemonOptions;
    lock: StateLock;
    engine: Engine;
    registry: DeviceRegistry;
    nbdServer: NbdServer | null;
    fuseServer: FuseServer | null;
    backupMounts: BackupMounts;
    controlServer: ControlServer;
    shutdownController: AbortController;
    addresses: ExportAddresses;
    accessFile: AccessFile;
    metricsListener: MetricsListener | null;
  }) {
    this.options = parts.options;
    this.lock = parts.lock;
    this.engine = parts.engine;
    this.registry = parts.registry;
    this.nbdServer = parts.nbdServer;
    this.fuseServer = parts.fuseServer;
    this.backupMounts = parts.backupMounts;
    this.controlServer = parts.controlServer;
    this.shutdownController = parts.shutdownController;
    this.addresses = parts.addresses;
    this.accessFile = parts.accessFile;
    this.metricsListener = parts.metricsListener;
  }

  /** Where --metrics-listen listens (the port actually bound), or null. */
  get metricsAddress(): { readonly host: string; readonly port: number } | null {
    const listener = this.metricsListener;
    return listener === null ? null : { host: listener.host, port: listener.port };
  }

  static async start(options: DaemonOptions): Promise<Daemon> {
    const { logger, stateDir } = options;
    const socketAccess = options.socketAccess ?? { group: null };
    // Checked before anything is started: a refused listener must not leave half a daemon behind.
    const nbdTls = await loadNbdTls(options.tls ?? {});
    const accessFile = await AccessFile.load(options.accessFile ?? null);
    // With TLS required no client gets past the handshake without credentials: no plaintext rule applies.
    const insecureNoTls = options.insecureNoTls === true || nbdTls.mode === "require";
    const tcpWarning =
      options.nbdTcp === null || nbdTls.mode === "require"
        ? null
        : plaintextTcpWarning(options.nbdTcp, insecureNoTls);
    await mkdir(stateDir, { recursive: true, mode: 0o700 });
    await applyStateDirAccess(stateDir, socketAccess);
    const lock = await StateLock.acquire(lockFilePathIn(stateDir), logger);
    const undo: UndoSteps = [() => lock.release()];
    try {
      // The mount comes up below; the freezer and the path policy read its directory when they need it.
      const fuseMount: FuseMountRef = { dir: null };
      const ioMetrics = new IoMetrics();
      const engineCounters = new EngineCounters();
      const { engine, registry, snapshotKeeper } = await openEngine(options, fuseMount, undo, {
        io: ioMetrics,
        counters: engineCounters,
      });

      // The faces serve the engine's devices and images and the backups mounted through the API.
      const backupMounts = new BackupMounts(logger);
      undo.push(() => backupMounts.close());
      const served = new MergedExportSource([engine, backupMounts.exports]);
      const { nbdServer, nbdTcp } = await startNbd(served, options, socketAccess, tcpWarning, undo, {
        tls: nbdTls,
        access: accessFile,
      });

      let fuseServer: FuseServer | null = null;
      const metricsSources = daemonMetricsSources({
        version: options.version,
        engine,
        io: ioMetrics,
        counters: engineCounters,
        nbdServer,
        fuseServer: () => fuseServer,
      });

      const metricsListener = await listenMetrics(options, () => renderMetrics(metricsSources));
      if (metricsListener !== null) undo.push(() => metricsListener.close());

      const mounted = await mountFuse(served, options);
      fuseServer = mounted;
      if (mounted !== null) undo.push(() => mounted.unmount());
      fuseMount.dir = fuseServer?.mountDir ?? null;

      const shutdownController = new AbortController();
      const addresses: ExportAddresses = {
        nbdSocketPath: options.nbdSocketPath,
        nbdTcp,
        fuseMountDir: fuseServer === null ? null : fuseServer.mountDir,
        nbdTlsRequired: nbdTls.mode === "require",
      };
      const tlsView = nbdTlsView(nbdTls);
      const access = accessView(options, socketAccess, nbdTcp, tlsView, accessFile);
      // The context's restart hook needs the Daemon built below.
      let built: Daemon | null = null;
      const controlServer = await startControlServer(options, {
        engine,
        registry,
        snapshotRecoveries: () => snapshotKeeper.recoveries,
        addresses,
        shutdownSignal: shutdownController.signal,
        access,
        backupMounts,
        backups: new BackupJobs(
          {
            createSnapshot: (createOptions) => engine.createSnapshot(createOptions),
            takeSnapshot: (id) => engine.takeSnapshot(id),
            destroySnapshot: (id) => engine.destroySnapshot(id),
            snapshotInfo: (id) => engine.snapshotInfo(id),
            findExport: (name) => engine.findExport(name),
            cbtInfo: (name) => engine.cbtInfo(name),
            cbtRead: (name) => engine.cbtRead(name),
            deviceSizeBytes: (name) => engine.deviceInfo(name).sizeBytes,
            deviceUsers: async (name) => {
              const clients = nbdServer?.connectionsOn(name) ?? 0;
              const loops =
                fuseMount.dir === null ? [] : await loopDeviceUsersOver(join(fuseMount.dir, name));
              return clients === 0 ? loops : [`${clients} NBD client(s) on export ${name}`, ...loops];
            },
          },
          logger,
        ),
        restart: (restartOptions) => {
          assert(built !== null, "restart before the daemon is built");
          return built.requestRestart(restartOptions);
        },
        nbdTls: tlsView,
        metrics: () => renderMetrics(metricsSources),
        imageUsers: async (exportName) =>
          fuseMount.dir === null
            ? []
            : loopDeviceUsersOver(join(fuseMount.dir, exportName), { attached: true }),
        storageOnDevices: async (storagePath, devices) => {
          const dir = fuseMount.dir;
          if (dir === null) return null;
          return storageOnDevices(storagePath, new Map(devices.map((name) => [name, join(dir, name)])));
        },
        accessRules: {
          view: () => accessFile.view(),
          reload: () => {
            assert(built !== null, "reload before the daemon is built");
            return built.reloadAccess();
          },
        },
      });
      logReady(options, addresses, access, engine, registry);
      options.supervised?.ready();
      built = new Daemon({
        options,
        lock,
        engine,
        registry,
        nbdServer,
        fuseServer,
        backupMounts,
        controlServer,
        shutdownController,
        addresses,
        accessFile,
        metricsListener,
      });
      return built;
    } catch (error) {
      for (const step of undo.reverse()) {
        await step().catch((undoError: unknown) => {
          logger.warn({ err: (undoError as Error)?.message }, "cleanup after a failed start failed");
        });
      }
      throw error;
    }
  }

  /**
   * Reads the access file again (SIGHUP, POST /v1/access/reload). A bad file keeps the rules in force and
   * throws its one-line error; good rules apply at once to every NBD connection (access-file.ts).
   */
  async reloadAccess(): Promise<AccessRulesView> {
    const { logger } = this.options;
    let view: AccessRulesView;
    try {
      view = await this.accessFile.reload();
    } catch (error) {
      if (this.accessFile.path !== null) {
        logger.error({ err: (error as Error).message }, "access rules not reloaded: the rules in force stay");
      }
      throw error;
    }
    const outcome = this.nbdServer?.reviewAccess() ?? { closed: 0, readOnly: 0 };
    logger.info(
      {
        file: view.file,
        rules: view.rules?.length ?? 0,
        connectionsClosed: outcome.closed,
        connectionsMadeReadOnly: outcome.readOnly,
      },
      "access rules reloaded",
    );
    return view;
  }

  /**
   * The file systems mounted on loop devices over our FUSE files: what a stop would cut off (their next
   * writes fail and the journal aborts), so serve.ts waits for them to go first.
   */
  mountedFileSystems(): LoopMount[] {
    return this.fuseServer === null ? [] : findLoopMountsUnder(this.fuseServer.mountDir);
  }

  /**
   * Begins a planned restart (supervised engines): refused while a snapshot on memory: storage exists
   * unless forced (only those are lost; the others are kept by the snapshot keeper); the hand-over starts
   * once the supervisor has loaded the successor.
   */
  requestRestart(options: { force: boolean }): { enginePid: number } {
    if (this.stopping !== null) throw new BlockError("ESHUTDOWN", "the daemon is already stopping");
    const inMemory = this.engine.listSnapshots().filter((info) => info.storage.kind === "memory").length;
    if (inMemory > 0 && !options.force) {
      throw new BlockError(
        "EBUSY",
        `${inMemory} snapshot(s) on memory: storage would be lost by a restart (snapshots on files, directories and block devices are kept): destroy them first, or restart with --force`,
      );
    }
    const link = this.options.supervised;
    assert(link !== undefined, "restart without a supervisor");
    this.stopping = new Promise<void>((resolve) => {
      link.requestRestart(() => {
        void this.handOver().finally(resolve);
      });
    });
    return { enginePid: process.pid };
  }

  /**
   * A planned restart: like a stop, but FUSE is detached instead of unmounted (the supervisor keeps the
   * connection for the next engine) and the socket files stay. Ends the process (EngineLink.endHandedOver).
   */
  private async handOver(): Promise<void> {
    const { logger, supervised } = this.options;
    assert(supervised !== undefined, "hand-over without a supervisor");
    logger.info("planned restart: handing over to the next engine");
    supervised.beginHandover();
    this.shutdownController.abort();
    const steps: [string, () => Promise<void>][] = [
      ["control server", () => this.controlServer.close()],
      // Before the lock: the successor starts once the lock is free, and binds the same address.
      ["metrics listener", async () => this.metricsListener?.close()],
      ["NBD server", async () => this.nbdServer?.close()],
      ["FUSE", async () => this.fuseServer?.detach()],
      ["backup mounts", () => this.backupMounts.close()],
      ["CBT state", () => this.registry.saveCbtStates()],
      // The successor opens the same files and shares their page cache: nothing to flush for it.
      ["engine", () => this.engine.close({ flush: false })],
      ["lock", () => this.lock.release()],
    ];
    for (const [what, step] of steps) {
      try {
        await step();
      } catch (error) {
        logger.error({ err: (error as Error)?.message }, `handing over the ${what} failed`);
      }
    }
    logger.info("handed over");
    supervised.endHandedOver();
  }

  /** Idempotent; see the stop order in the notes above. */
  stop(): Promise<void> {
    this.stopping ??= this.stopOnce();
    return this.stopping;
  }

  private async stopOnce(): Promise<void> {
    const { logger } = this.options;
    logger.info("blocksnap daemon stopping");
    this.shutdownController.abort();
    const steps: [string, () => Promise<void>][] = [
      ["control server", () => this.controlServer.close()],
      ["metrics listener", async () => this.metricsListener?.close()],
      ["NBD server", async () => this.nbdServer?.close()],
      [
        "FUSE",
        async () => {
          await this.fuseServer?.unmount();
          // Unmounted: there is no session left for a successor to resume.
          await rm(fuseSessionStatePathIn(this.options.stateDir), { force: true });
        },
      ],
      ["backup mounts", () => this.backupMounts.close()],
      // After the faces, so no write can follow; before the engine closes the backends.
      ["CBT state", () => this.registry.saveCbtStates()],
      ["engine", () => this.engine.close()],
      [
        "NBD socket",
        async () => {
          const ownsSocket = this.options.supervised === undefined;
          if (ownsSocket && this.options.nbdSocketPath !== null) {
            await rm(this.options.nbdSocketPath, { force: true });
          }
        },
      ],
      ["lock", () => this.lock.release()],
    ];
    for (const [what, step] of steps) {
      try {
        await step();
      } catch (error) {
        logger.error({ err: (error as Error)?.message }, `stopping the ${what} failed`);
      }
    }
    logger.info("blocksnap daemon stopped");
  }
}

type UndoSteps = (() => Promise<void>)[];

/** Where the FUSE mount is, once it is up (null before, or without FUSE). */
interface FuseMountRef {
  dir: string | null;
}

/** The engine with its freezer and path policy, and the devices of the registry attached again. */
async function openEngine(
  options: DaemonOptions,
  fuseMount: FuseMountRef,
  undo: UndoSteps,
  metrics: { readonly io: IoMetrics; readonly counters: EngineCounters },
): Promise<{ engine: Engine; registry: DeviceRegistry; snapshotKeeper: SnapshotKeeper }> {
  const { logger, stateDir } = options;
  // Take freezes the file systems on loop devices over our FUSE files.
  const freezer = new LoopFreezer({
    deviceFilePath: (deviceName) => (fuseMount.dir === null ? null : join(fuseMount.dir, deviceName)),
    logger,
  });
  const pathPolicy = new DaemonPathPolicy({ stateDir, fuseMountDir: () => fuseMount.dir });
  const snapshotKeeper = new SnapshotKeeper(stateDir, logger);
  const engine = new Engine({
    logger,
    freezer,
    pathPolicy,
    persistence: snapshotKeeper,
    exportStage: (device, identity) => metrics.io.stage(device, identity),
    observer: {
      snapshotTaken: (info) => metrics.counters.taken(info.takeStallMs),
      snapshotEvent: (_id, event) => metrics.counters.event(event.type),
    },
  });
  undo.push(() => engine.close());
  const registry = new DeviceRegistry(deviceRegistryPathIn(stateDir), engine, logger, {
    deviceUsers: async (name) =>
      fuseMount.dir === null ? [] : loopDeviceUsersOver(join(fuseMount.dir, name)),
  });
  await registry.restore();
  // A start that fails after this point gives the CBT states back, as a clean stop would.
  undo.push(() => registry.saveCbtStates());
  // Snapshots after their devices, before any face serves: no write reaches a member before its snapshot.
  await snapshotKeeper.restoreAll(engine);
  return { engine, registry, snapshotKeeper };
}

function logReady(
  options: DaemonOptions,
  addresses: ExportAddresses,
  access: AccessView,
  engine: Engine,
  registry: DeviceRegistry,
): void {
  const { nbdTcp } = addresses;
  options.logger.info(
    {
      version: options.version,
      stateDir: options.stateDir,
      controlSocket: options.controlSocketPath,
      nbdSocket: addresses.nbdSocketPath,
      nbdTcp: nbdTcp === null ? null : `${nbdTcp.host}:${nbdTcp.port}`,
      fuseMountDir: addresses.fuseMountDir,
      devices: engine.listDevices().length,
      devicesUnavailable: registry.unavailable().length,
      whoCanConnect: access.whoCanConnect,
    },
    "blocksnap daemon ready",
  );
}

/** The NBD face: the supervisor's connections, or our own listeners (Unix socket, TCP, socket activation). */
async function startNbd(
  source: ExportSource,
  options: DaemonOptions,
  socketAccess: SocketAccess,
  tcpWarning: string | null,
  undo: UndoSteps,
  policy: { readonly tls: NbdTls; readonly access: AccessPolicy },
): Promise<{ nbdServer: NbdServer | null; nbdTcp: ExportAddresses["nbdTcp"] }> {
  const { logger } = options;
  const nbdTls = policy.tls;
  const activationFd = options.nbdActivationFd ?? null;
  const link = options.supervised;
  if (link !== undefined) {
    // The supervisor decided which NBD listeners exist; any connection it passes is served.
    const server = new NbdServer(source, {
      ...options.nbdLimits,
      logger,
      tls: nbdTls,
      access: policy.access,
    });
    undo.push(() => server.close());
    link.onConnection("nbd", (socket) => server.serveSocket(socket));
    return { nbdServer: server, nbdTcp: link.hello.nbdTcp };
  }
  if (options.nbdSocketPath === null && options.nbdTcp === null && activationFd === null) {
    return { nbdServer: null, nbdTcp: null };
  }
  const server = new NbdServer(source, { ...options.nbdLimits, logger, tls: nbdTls, access: policy.access });
  undo.push(() => server.close());
  let nbdTcp: ExportAddresses["nbdTcp"] = null;
  if (options.nbdSocketPath !== null) {
    const socketPath = options.nbdSocketPath;
    await removeStaleSocket(socketPath);
    await listenRestricted(socketPath, socketAccess, () => server.listenUnix(socketPath));
    undo.push(() => rm(socketPath, { force: true }));
  }
  if (options.nbdTcp !== null) {
    nbdTcp = await listenNbdTcp(server, options.nbdTcp);
    const where = { nbdTcp: `${nbdTcp.host}:${nbdTcp.port}`, tls: nbdTls.mode };
    if (tcpWarning === null) logger.info(where, "NBD over TCP, TLS required");
    else logger.warn(where, tcpWarning);
  }
  if (activationFd !== null) {
    const activatedTcp = await server.listenFd(activationFd);
    // A socket unit can name any address: the rule of --nbd-listen holds for it too.
    const activatedWarning =
      activatedTcp === null || nbdTls.mode === "require"
        ? null
        : plaintextTcpWarning(activatedTcp, options.insecureNoTls === true);
    if (activatedWarning !== null) logger.warn({ fd: activationFd }, activatedWarning);
    logger.info({ fd: activationFd }, "serving NBD on the socket-activation descriptor");
  }
  return { nbdServer: server, nbdTcp };
}

/** Who can connect (`status`): the socket mode and group, and one line per face. */
function accessView(
  options: DaemonOptions,
  socketAccess: SocketAccess,
  nbdTcp: ExportAddresses["nbdTcp"],
  tls: TlsView,
  accessFile: AccessFile,
): AccessView {
  return {
    socketMode: `0${socketMode(socketAccess).toString(8)}`,
    socketGroup: socketAccess.group?.name ?? null,
    whoCanConnect: describeAccess({
      access: socketAccess,
      nbdSocketPath: options.nbdSocketPath,
      nbdActivation: (options.nbdActivationFd ?? null) !== null,
      nbdTcp,
      tls,
      accessFile: accessFile.path,
    }),
  };
}

function nbdTlsView(nbdTls: NbdTls): TlsView {
  return {
    mode: nbdTls.mode,
    credentials: [
      ...(nbdTls.x509 ? (["x509"] as const) : []),
      ...(nbdTls.psk !== null ? (["psk"] as const) : []),
    ],
    verifyPeer: nbdTls.verifyPeer,
  };
}

/**
 * Logs every level change at info, while the more talkative of the two levels is in force, so the line shows
 * whenever either level shows info lines.
 */
function loggedLevelChanges(control: LogLevelControl, logger: Logger): LogLevelControl {
  // logLevelNames runs from fatal (fewest lines) to trace (most); silent, last, shows none.
  const verbosity = (level: LogLevelName): number => (level === "silent" ? -1 : logLevelNames.indexOf(level));
  return {
    get: () => control.get(),
    set: (level) => {
      const previous = control.get();
      const louder = verbosity(level) > verbosity(previous);
      if (louder) control.set(level);
      logger.info({ from: previous, to: level }, "log level changed");
      if (!louder) control.set(level);
    },
  };
}

/** The control API: our own socket, or the connections the supervisor passes. */
async function startControlServer(
  options: DaemonOptions,
  parts: {
    readonly engine: Engine;
    readonly registry: DeviceRegistry;
    readonly snapshotRecoveries: () => readonly SnapshotRecoveryView[];
    readonly addresses: ExportAddresses;
    readonly shutdownSignal: AbortSignal;
    readonly access: AccessView;
    readonly backups: BackupJobs;
    readonly backupMounts: BackupMounts;
    readonly restart: (restartOptions: { force: boolean }) => ReturnType<Daemon["requestRestart"]>;
    readonly accessRules: ControlContext["accessRules"];
    readonly nbdTls: TlsView;
    readonly metrics: () => string;
    readonly imageUsers: NonNullable<ControlContext["imageUsers"]>;
    readonly storageOnDevices: NonNullable<ControlContext["storageOnDevices"]>;
  },
): Promise<ControlServer> {
  const link = options.supervised;
  const controlOptions = {
    socketPath: options.controlSocketPath,
    logger: options.logger,
    access: options.socketAccess ?? { group: null },
    context: {
      engine: parts.engine,
      registry: parts.registry,
      snapshotRecoveries: parts.snapshotRecoveries,
      addresses: parts.addresses,
      shutdownSignal: parts.shutdownSignal,
      backups: parts.backups,
      backupMounts: parts.backupMounts,
      accessRules: parts.accessRules,
      nbdTls: parts.nbdTls,
      metrics: parts.metrics,
      imageUsers: parts.imageUsers,
      storageOnDevices: parts.storageOnDevices,
      logger: options.logger,
      ...(options.logLevel === undefined
        ? {}
        : { logLevel: loggedLevelChanges(options.logLevel, options.logger) }),
      ...(link === undefined ? {} : { restart: parts.restart }),
      identity: {
        pid: process.pid,
        version: options.version,
        stateDir: options.stateDir,
        controlSocket: options.controlSocketPath,
        access: parts.access,
        ...(link === undefined
          ? {}
          : {
              supervisor: {
                pid: link.hello.supervisorPid,
                engineNumber: link.hello.engineNumber,
                restarts: link.hello.restarts,
              },
            }),
      },
    },
  };
  if (link === undefined) return ControlServer.listen(controlOptions);
  const attached = ControlServer.attach(controlOptions);
  link.onConnection("control", (socket) => attached.acceptConnection(socket));
  return attached;
}

async function listenNbdTcp(
  server: NbdServer,
  address: { readonly host: string; readonly port: number },
): Promise<{ host: string; port: number }> {
  try {
    return await server.listenTcp(address.host, address.port);
  } catch (error) {
    const code = (error as { code?: unknown } | null)?.code;
    const text = error instanceof Error ? error.message : String(error);
    if (code === "EADDRINUSE" || text.includes("EADDRINUSE")) {
      throw new BlockError(
        "EBUSY",
        `NBD TCP address ${address.host}:${address.port} is already in use (choose another with --nbd-listen HOST:PORT, or --nbd-listen none)`,
        { cause: error },
      );
    }
    throw toBlockError(error, `cannot listen for NBD on ${address.host}:${address.port}`);
  }
}

/**
 * The --metrics-listen listener. The engine listens itself, supervised too: metrics need not survive a
 * restart (a scrape in the gap fails), and the successor binds the address once this engine let it go.
 */
async function listenMetrics(options: DaemonOptions, render: () => string): Promise<MetricsListener | null> {
  const address = options.metricsTcp ?? null;
  if (address === null) return null;
  const listener = await MetricsListener.listen(address, render, options.logger);
  const where = { metricsTcp: `${listener.host}:${listener.port}` };
  if (isLoopbackHost(listener.host))
    options.logger.info(where, "Prometheus metrics over TCP (GET /metrics only)");
  else
    options.logger.warn(
      where,
      "Prometheus metrics over TCP on a non-loopback address: unauthenticated, anyone who reaches it reads device names, snapshot ids and I/O volumes",
    );
  return listener;
}

async function mountFuse(source: ExportSource, options: DaemonOptions): Promise<FuseServer | null> {
  const { fuse, logger } = options;
  if (fuse === null) return null;
  if (!fuse.required && process.getuid?.() !== 0) {
    logger.info("FUSE face off: mounting needs root (NBD is still served)");
    return null;
  }
  const link = options.supervised;
  if (link !== undefined && link.hello.fuseFd === null) return null;
  const inherited =
    link?.hello.fuseFd == null
      ? {}
      : { inheritedFd: link.hello.fuseFd, statePath: fuseSessionStatePathIn(options.stateDir) };
  if (link?.hello.resumeFuse === true && inherited.inheritedFd !== undefined) {
    // No fallback here: an engine that cannot resume fails, and the supervisor starts a fresh connection.
    try {
      return await FuseServer.resume(source, {
        mountDir: fuse.mountDir,
        logger,
        inheritedFd: inherited.inheritedFd,
        statePath: fuseSessionStatePathIn(options.stateDir),
      });
    } catch (error) {
      link?.resumeFailed(String(error));
      throw error;
    }
  }
  try {
    // The dead mount of a daemon killed with -9 first: until it is gone, even mkdir fails with ENOTCONN.
    if (await cleanStaleMount(fuse.mountDir)) {
      logger.warn({ mountDir: fuse.mountDir }, "removed a stale FUSE mount left by a previous daemon");
    }
    await mkdir(fuse.mountDir, { recursive: true, mode: 0o755 });
    return await FuseServer.mount(source, { mountDir: fuse.mountDir, logger, ...inherited });
  } catch (error) {
    const blockError = toBlockError(error, `cannot mount FUSE at ${fuse.mountDir}`);
    if (fuse.required) throw blockError;
    logger.error(
      { mountDir: fuse.mountDir, errno: blockError.errno, err: blockError.message },
      "FUSE mount failed; continuing without FUSE",
    );
    return null;
  }
}

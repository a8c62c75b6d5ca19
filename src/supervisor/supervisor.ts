/**
 * The supervisor of `blocksnap serve --supervise`: a small process that owns what must outlive the engine
 * — the listening sockets (control, NBD on Unix and TCP) and the /dev/fuse descriptor with its mount — and
 * runs the engine (the rest of the daemon: `blocksnap serve` again, marked by engineEnvironmentKey) as its
 * child. It has no engine code: it never reads a request.
 *
 * Connections: the listeners accept with pauseOnConnect, so not a byte is read here, and each accepted
 * socket is passed to the engine over the IPC channel (the way Node's cluster module does it). While no
 * engine is ready — starting, restarting, handing over — they wait in a bounded queue; beyond it they are
 * closed. NBD connections open when an engine dies end with it (the protocol has no resume); clients that
 * reconnect are served by the next engine.
 *
 * FUSE: the first engine mounts the descriptor it inherits (stdio slot engineFuseFd) and answers INIT; the
 * kernel's connection lives as long as any process holds the descriptor, so when an engine dies the
 * supervisor's copy keeps it: file systems on loop devices over our files see their requests wait, not
 * fail. The next engine resumes the session (FuseServer.resume: saved node ids and handles, and
 * FUSE_NOTIFY_RESEND for the requests the dead engine had read). An engine that cannot resume is followed
 * by one on a fresh connection (the old mount is unmounted lazily and aborted: its users see I/O errors).
 *
 * Restarts: an engine that dies after it was ready is replaced at once. One that dies before it is ready
 * (a crash loop at start) is replaced after growing delays, and after startFailuresMax of those in a row —
 * or more than deathsPerWindowMax deaths within deathWindowMs — the supervisor gives up, says why, cleans
 * up and exits 1. The first engine failing before it is ready is a start failure: no restart, its exit code is
 * ours. A planned restart (the engine's POST /v1/restart) ends with the engine's "handed-over" message
 * (and its SIGKILL of itself) and is followed by a new engine at once, without counting as a death.
 *
 * Signals: SIGTERM/SIGINT go to the engine, whose stop does what a plain `serve` does (waits for
 * mounted file systems, unmounts FUSE); the supervisor then removes its sockets and exits with the engine's
 * code. SIGHUP goes to the engine alone, which rereads its access rules (src/daemon/serve.ts) and serves on. If the supervisor itself is killed, the engine sees its IPC channel close and stops as at SIGTERM.
 */
import { type ChildProcess, spawn } from "node:child_process";
import * as fs from "node:fs";
import { mkdir, rm } from "node:fs/promises";
import * as net from "node:net";
import { BlockError, toBlockError } from "../block/errors.js";
import type { SocketAccess } from "../daemon/socket-access.js";
import { applyStateDirAccess, listenRestricted, plaintextTcpWarning } from "../daemon/socket-access.js";
import { removeStaleSocket } from "../daemon/stale-socket.js";
import {
  type EngineMessage,
  type EngineRestartRecord,
  engineEnvironmentKey,
  engineFuseFd,
  type ListenerKind,
  type SupervisorMessage,
} from "../daemon/supervisor-protocol.js";
import { abortConnection, blocksnapMountsAt, canonicalMountDir, unmountFuse } from "../fuse/fuse-mount.js";
import type { Logger } from "../util/logger.js";

export interface SupervisorOptions {
  readonly stateDir: string;
  readonly controlSocketPath: string;
  readonly nbdSocketPath: string | null;
  readonly nbdTcp: { readonly host: string; readonly port: number } | null;
  readonly insecureNoTls: boolean;
  readonly socketAccess: SocketAccess;
  readonly nbdActivationFd: number | null;
  readonly fuse: { readonly mountDir: string; readonly required: boolean } | null;
  readonly logger: Logger;
  /** The engine's command line: this process's own (`serve …`), re-run with engineEnvironmentKey set. */
  readonly engineArgv: readonly string[];
}

const queuedConnectionsMax = 256;
const deathWindowMs = 60_000;
const deathsPerWindowMax = 30;
const startFailuresMax = 5;
const restartDelaysMs = [0, 250, 500, 1_000, 2_000, 4_000];
const engineExitGraceMs = 5_000;
const fuseUnmountAttemptsMax = 16;
const lateMountChecks = 5;
const lateMountCheckIntervalMs = 100;
/** Engine deaths kept for status. */
const restartRecordsMax = 32;

interface Listener {
  readonly kind: ListenerKind;
  readonly server: net.Server;
  readonly socketPath: string | null;
}

/** Resolves with the process's exit code once the supervisor has stopped; start failures reject. */
export async function superviseEngine(options: SupervisorOptions): Promise<number> {
  const supervisor = new Supervisor(options);
  await supervisor.start();
  return await supervisor.finished;
}

class Supervisor {
  readonly finished: Promise<number>;
  private readonly options: SupervisorOptions;
  private readonly logger: Logger;
  private readonly listeners: Listener[] = [];
  private readonly queue: { kind: ListenerKind; socket: net.Socket }[] = [];
  private readonly restarts: EngineRestartRecord[] = [];
  private readonly deathTimes: number[] = [];
  /** Engines in a row that died before they were ready. */
  private startFailures = 0;
  private resolveFinished: (code: number) => void = () => {};
  private fuseFd: number | null = null;
  private nbdTcp: { host: string; port: number } | null = null;
  private engine: ChildProcess | null = null;
  /** A loaded engine process waiting for its hello, and the /dev/fuse descriptor it inherited. */
  private standby: { process: ChildProcess; fuseFd: number | null; loaded: Promise<void> } | null = null;
  private engineReady = false;
  private handingOver = false;
  private handedOver = false;
  private everReady = false;
  /** An engine has mounted the current /dev/fuse descriptor and answered INIT: the next one resumes. */
  private fuseSetUp = false;
  private engineNumber = 0;
  /** The engine that was started to resume FUSE never became ready: the next one gets a fresh connection. */
  private resumeFailed = false;
  private stopping = false;
  private finishing = false;
  private restartTimer: NodeJS.Timeout | null = null;

  constructor(options: SupervisorOptions) {
    this.options = options;
    this.logger = options.logger;
    this.finished = new Promise((resolve) => {
      this.resolveFinished = resolve;
    });
  }

  async start(): Promise<void> {
    const { options } = this;
    if (options.nbdTcp !== null) plaintextTcpWarning(options.nbdTcp, options.insecureNoTls);
    await mkdir(options.stateDir, { recursive: true, mode: 0o700 });
    await applyStateDirAccess(options.stateDir, options.socketAccess);
    try {
      await this.listenAll();
      this.fuseFd = this.openFuse();
    } catch (error) {
      await this.closeListeners();
      throw error;
    }
    for (const signal of ["SIGTERM", "SIGINT", "SIGHUP"] as const) {
      process.on(signal, () => this.onSignal(signal));
    }
    this.startEngine();
  }

  private async listenAll(): Promise<void> {
    const { options } = this;
    await removeStaleSocket(options.controlSocketPath);
    await this.listenUnix("control", options.controlSocketPath);
    if (options.nbdSocketPath !== null) {
      await removeStaleSocket(options.nbdSocketPath);
      await this.listenUnix("nbd", options.nbdSocketPath);
    }
    if (options.nbdTcp !== null) {
      const server = await this.listen("nbd", null, { host: options.nbdTcp.host, port: options.nbdTcp.port });
      const address = server.address() as net.AddressInfo;
      this.nbdTcp = { host: address.address, port: address.port };
    }
    if (options.nbdActivationFd !== null) await this.listen("nbd", null, { fd: options.nbdActivationFd });
  }

  private async listenUnix(kind: ListenerKind, socketPath: string): Promise<void> {
    await listenRestricted(socketPath, this.options.socketAccess, async () => {
      await this.listen(kind, socketPath, { path: socketPath });
    });
  }

  private listen(
    kind: ListenerKind,
    socketPath: string | null,
    address: net.ListenOptions | { readonly fd: number },
  ): Promise<net.Server> {
    const server = net.createServer({ pauseOnConnect: true }, (socket) => this.route(kind, socket));
    return new Promise((resolve, reject) => {
      server.once("error", (error) => reject(toBlockError(error, `cannot listen for ${kind} connections`)));
      server.listen(address, () => {
        server.removeAllListeners("error");
        server.on("error", (error) => this.logger.error({ err: error, kind }, "listener error"));
        this.listeners.push({ kind, server, socketPath });
        resolve(server);
      });
    });
  }

  /** The /dev/fuse descriptor the engines share, or null when there is no FUSE face. */
  private openFuse(): number | null {
    const { fuse } = this.options;
    if (fuse === null) return null;
    if ((process.getuid?.() ?? -1) !== 0) {
      if (fuse.required)
        throw new BlockError("EPERM", "Serving exports over FUSE needs root (mount -t fuse)");
      this.logger.info("FUSE face off: mounting needs root (NBD is still served)");
      return null;
    }
    try {
      return fs.openSync("/dev/fuse", fs.constants.O_RDWR);
    } catch (error) {
      throw toBlockError(error, "Cannot open /dev/fuse");
    }
  }

  private route(kind: ListenerKind, socket: net.Socket): void {
    socket.on("error", () => socket.destroy());
    if (this.engineReady && this.engine !== null) {
      this.forward(this.engine, kind, socket);
      return;
    }
    if (this.queue.length >= queuedConnectionsMax || this.stopping) {
      socket.destroy();
      return;
    }
    this.queue.push({ kind, socket });
  }

  private forward(engine: ChildProcess, kind: ListenerKind, socket: net.Socket): void {
    const message: SupervisorMessage = { kind: "connection", listener: kind };
    try {
      engine.send(message, socket, { keepOpen: false }, (error) => {
        if (error) socket.destroy();
      });
    } catch {
      socket.destroy();
    }
  }

  /**
   * Makes the standby (or, without one, a new process) the engine: its hello says how to start. A new
   * standby is loaded once this engine is ready, so the next restart skips Node's boot.
   */
  private startEngine(): void {
    const fuseResumable = this.fuseFd !== null && this.fuseSetUp && !this.resumeFailed;
    this.engineNumber += 1;
    const standby = this.standby;
    this.standby = null;
    const engine = standby !== null && standby.fuseFd === this.fuseFd ? standby.process : this.spawnEngine();
    if (standby !== null && engine !== standby.process) standby.process.kill("SIGKILL");
    this.engine = engine;
    this.engineReady = false;
    this.handingOver = false;
    this.handedOver = false;
    const hello: SupervisorMessage = {
      kind: "hello",
      resumeFuse: fuseResumable,
      fuseFd: this.fuseFd === null ? null : engineFuseFd,
      nbdTcp: this.nbdTcp,
      supervisorPid: process.pid,
      engineNumber: this.engineNumber,
      restarts: [...this.restarts],
    };
    engine.send(hello, (error) => {
      if (error) this.logger.warn({ err: error.message }, "the engine is gone before its hello");
    });
    this.logger.info(
      {
        enginePid: engine.pid,
        engineNumber: this.engineNumber,
        resumeFuse: fuseResumable,
        warm: engine === standby?.process,
      },
      "engine started",
    );
  }

  /** A process that loads the engine's code and waits for its hello (a standby until then). */
  private spawnEngine(): ChildProcess {
    const child = spawn(process.execPath, [...process.execArgv, ...this.options.engineArgv], {
      env: { ...process.env, [engineEnvironmentKey]: String(process.pid) },
      stdio: ["ignore", "inherit", "inherit", "ipc", this.fuseFd ?? "ignore"],
    });
    child.on("message", (message: EngineMessage) => this.onEngineMessage(child, message));
    child.on("error", (error) => this.logger.error({ err: error }, "engine process error"));
    child.on("exit", (code, signal) => this.onEngineExit(child, code, signal));
    return child;
  }

  /** Loads a standby for the next restart (replacing an older one: an upgrade must run the new code). */
  private prepareStandby(): Promise<void> {
    if (this.stopping) return Promise.resolve();
    this.standby?.process.kill("SIGKILL");
    const child = this.spawnEngine();
    const loaded = new Promise<void>((resolve) => {
      const done = () => {
        child.off("message", onMessage);
        resolve();
      };
      const onMessage = (message: EngineMessage) => {
        if (message?.kind === "loaded") done();
      };
      child.on("message", onMessage);
      child.once("exit", done);
    });
    this.standby = { process: child, fuseFd: this.fuseFd, loaded };
    return loaded;
  }

  private onEngineMessage(engine: ChildProcess, message: EngineMessage): void {
    if (engine !== this.engine) return;
    if (message.kind === "ready") {
      this.engineReady = true;
      this.everReady = true;
      this.fuseSetUp = this.fuseFd !== null;
      this.resumeFailed = false;
      for (const { kind, socket } of this.queue.splice(0)) this.forward(engine, kind, socket);
      if (this.standby === null) void this.prepareStandby();
      return;
    }
    if (message.kind === "restart-requested") {
      // A fresh standby even if one waits: after an upgrade in place it must run the new code.
      void this.prepareStandby().then(() => {
        if (engine === this.engine && !this.stopping)
          engine.send({ kind: "hand-over-now" } satisfies SupervisorMessage);
      });
      return;
    }
    if (message.kind === "handover") {
      this.engineReady = false;
      this.handingOver = true;
      this.logger.info({ enginePid: engine.pid }, "planned restart: the engine is handing over");
      return;
    }
    if (message.kind === "handed-over" && this.handingOver) this.handedOver = true;
    if (message.kind === "resume-failed") {
      this.logger.error({ reason: message.reason }, "the engine could not resume the FUSE session");
      this.resumeFailed = true;
    }
  }

  private onEngineExit(engine: ChildProcess, code: number | null, signal: NodeJS.Signals | null): void {
    if (engine === this.standby?.process) {
      // A standby that died (killed from outside, or out of memory): the next restart boots a process.
      this.standby = null;
      return;
    }
    if (engine !== this.engine) return;
    const wasReady = this.engineReady || this.handingOver;
    this.engine = null;
    this.engineReady = false;
    if (this.stopping) {
      void this.finish(code ?? 1);
      return;
    }
    if (this.handedOver) {
      this.logger.info("planned restart: starting the next engine");
      this.startEngine();
      return;
    }
    const cause = signal !== null ? `killed by ${signal}` : `exit code ${code}`;
    if (!this.everReady) {
      this.logger.error({ cause }, "the engine failed to start");
      this.stopping = true;
      void this.finish(code === null || code === 0 ? 1 : code);
      return;
    }
    // A connection no engine has finished setting up may be half mounted (INIT unanswered): nobody uses it
    // yet, so the next engine gets a fresh one. A set-up one is resumed again unless resuming failed.
    if (!wasReady && this.fuseFd !== null && !this.fuseSetUp) this.resumeFailed = true;
    this.startFailures = wasReady ? 0 : this.startFailures + 1;
    const now = Date.now();
    this.restarts.push({ at: new Date(now).toISOString(), cause });
    if (this.restarts.length > restartRecordsMax) this.restarts.shift();
    this.deathTimes.push(now);
    while ((this.deathTimes[0] ?? now) < now - deathWindowMs) this.deathTimes.shift();
    const giveUp =
      this.startFailures > startFailuresMax
        ? `${this.startFailures} engines in a row died before they were ready (last: ${cause})`
        : this.deathTimes.length > deathsPerWindowMax
          ? `the engine died ${this.deathTimes.length} times within ${deathWindowMs / 1000} s (last: ${cause})`
          : null;
    if (giveUp !== null) {
      this.logger.error({ lastCause: cause }, `giving up: ${giveUp}`);
      this.stopping = true;
      void this.finish(1);
      return;
    }
    const delayMs = restartDelaysMs[Math.min(this.startFailures, restartDelaysMs.length - 1)] ?? 0;
    this.logger.error({ cause, delayMs, restarts: this.restarts.length }, "the engine died: restarting it");
    this.restartTimer = setTimeout(() => {
      this.restartTimer = null;
      void this.restartEngine();
    }, delayMs);
  }

  private async restartEngine(): Promise<void> {
    if (this.stopping) return;
    if (this.resumeFailed && this.fuseFd !== null) await this.replaceFuseConnection();
    this.startEngine();
  }

  /** Gives up the old FUSE connection (its users see I/O errors) for a fresh one the next engine mounts. */
  private async replaceFuseConnection(): Promise<void> {
    this.logger.error(
      "the FUSE session could not be resumed: starting a fresh one (open files over it fail)",
    );
    await this.dropFuse();
    try {
      this.fuseFd = this.openFuse();
      this.fuseSetUp = false;
    } catch (error) {
      this.logger.error({ err: (error as Error).message }, "cannot open /dev/fuse again: FUSE face off");
      this.fuseFd = null;
    }
    this.resumeFailed = false;
  }

  private async dropFuse(): Promise<void> {
    const { fuse } = this.options;
    if (this.fuseFd === null || fuse === null) return;
    const mountDir = await canonicalMountDir(fuse.mountDir);
    await this.unmountAllAt(mountDir);
    fs.closeSync(this.fuseFd);
    this.fuseFd = null;
    // A mount(8) started by an engine that was killed meanwhile may still complete: look again, briefly.
    for (let check = 0; check < lateMountChecks; check++) {
      await new Promise((resolve) => setTimeout(resolve, lateMountCheckIntervalMs));
      await this.unmountAllAt(mountDir);
    }
  }

  /** Engines that died while mounting may have stacked mounts: removes them from the top. */
  private async unmountAllAt(mountDir: string): Promise<void> {
    for (let attempt = 0; attempt < fuseUnmountAttemptsMax; attempt++) {
      const mount = (await blocksnapMountsAt(mountDir)).at(-1);
      if (mount === undefined) return;
      await unmountFuse(mountDir, mount.deviceNumber, this.logger).catch(() => "gone");
      await abortConnection(mount.deviceNumber, this.logger);
    }
  }

  private onSignal(signal: NodeJS.Signals): void {
    if (signal === "SIGHUP") {
      this.engine?.kill(signal);
      return;
    }
    this.logger.info({ signal }, "signal received");
    this.stopping = true;
    if (this.restartTimer !== null) {
      clearTimeout(this.restartTimer);
      this.restartTimer = null;
    }
    if (this.engine !== null) this.engine.kill(signal);
    else void this.finish(0);
  }

  private async finish(code: number): Promise<void> {
    if (this.finishing) return;
    this.finishing = true;
    for (const { socket } of this.queue.splice(0)) socket.destroy();
    this.standby?.process.kill("SIGKILL");
    this.standby = null;
    const engine = this.engine;
    if (engine !== null && engine.exitCode === null && engine.signalCode === null) {
      const exited = new Promise((resolve) => engine.once("exit", resolve));
      engine.kill("SIGKILL");
      await Promise.race([exited, new Promise((resolve) => setTimeout(resolve, engineExitGraceMs).unref())]);
    }
    await this.closeListeners();
    // The engine's stop unmounted FUSE; after a give-up or a killed engine the mount is still ours.
    await this.dropFuse().catch((error: unknown) =>
      this.logger.error({ err: (error as Error).message }, "cannot unmount FUSE"),
    );
    this.logger.info({ code, restarts: this.restarts.length }, "supervisor stopped");
    this.resolveFinished(code);
  }

  private async closeListeners(): Promise<void> {
    for (const { server, socketPath } of this.listeners.splice(0)) {
      // Not awaited: the listener closes at once, but sockets passed to an engine stay counted as this
      // server's connections, so its close callback may never come.
      server.close();
      if (socketPath !== null) await rm(socketPath, { force: true });
    }
  }
}

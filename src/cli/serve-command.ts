/**
 * `blocksnap serve`: runs the daemon in the foreground (for systemd, a container, or a terminal). Every
 * default works without configuration and exposes nothing (docs/design/architecture.md): the sockets are the
 * daemon user's only and there is no TCP listener unless `--nbd-listen` asks for one; `none` turns a face off. The daemon code is
 * imported only here, lazily, so the client commands never load the engine.
 */

import { resolve } from "node:path";
import type { Command } from "commander";
import { InvalidArgumentError, Option } from "commander";
import {
  controlSocketPathIn,
  currentStateDirEnvironment,
  fuseMountDirIn,
  nbdSocketPathIn,
  resolveStateDir,
} from "../daemon/paths.js";
import { type LogLevelName, logLevelNames } from "../util/logger.js";
import { reportError } from "./command-context.js";
import { defaultConfigPath, loadConfigFile } from "./config-file.js";
import { chooseLogOutput, createDaemonLogger, levelControlOf } from "./log-output.js";
import { parseSize } from "./units.js";
import { packageVersion } from "./version.js";

interface ServeOptions {
  readonly stateDir?: string;
  readonly socket?: string;
  readonly nbdSocket?: string;
  readonly nbdListen?: { host: string; port: number } | "none";
  readonly metricsListen?: { host: string; port: number } | "none";
  readonly fuseMount?: string;
  readonly socketGroup?: string;
  readonly insecureNoTls?: boolean;
  readonly stopWait: number;
  readonly logLevel: LogLevelName;
  readonly json?: boolean;
  readonly config?: string;
  readonly supervise?: boolean;
  readonly tls?: "off" | "on" | "require";
  readonly tlsCert?: string;
  readonly tlsKey?: string;
  readonly tlsCa?: string;
  readonly tlsVerifyPeer?: boolean;
  readonly tlsPsk?: string;
  readonly access?: string;
  readonly maxConnections?: number;
  readonly maxConnectionsPerClient?: number;
  readonly maxInflightMemory?: number;
}

export const stopWaitSecondsDefault = 300;
const stopWaitSecondsMax = 86_400;

export function parseStopWait(text: string): number {
  const seconds = Number(text);
  if (!/^\d{1,6}$/.test(text) || seconds > stopWaitSecondsMax) {
    throw new InvalidArgumentError(
      `expected a whole number of seconds up to ${stopWaitSecondsMax}, got ${JSON.stringify(text)}`,
    );
  }
  return seconds;
}

/** `HOST:PORT`, `[IPV6]:PORT` or `none` (not null: commander turns a null result into ""). */
export function parseListenAddress(text: string): { host: string; port: number } | "none" {
  if (text === "none") return "none";
  const match = /^(?:\[([^\]]+)\]|([^:]+)):(\d{1,5})$/.exec(text);
  const port = match === null ? Number.NaN : Number(match[3]);
  if (match === null || port > 65535) {
    throw new InvalidArgumentError(
      `expected HOST:PORT (e.g. 127.0.0.1:10809) or none, got ${JSON.stringify(text)}`,
    );
  }
  return { host: match[1] ?? match[2] ?? "", port };
}

const connectionsLimitMax = 65_536;

/** A count limit for a serve flag: a whole number from 1 to connectionsLimitMax. */
export function parseConnectionLimit(text: string): number {
  const value = Number(text);
  if (!/^\d{1,6}$/.test(text) || value < 1 || value > connectionsLimitMax) {
    throw new InvalidArgumentError(
      `expected a whole number from 1 to ${connectionsLimitMax}, got ${JSON.stringify(text)}`,
    );
  }
  return value;
}

const inflightMemoryBytesMin = 64 * 1024 * 1024;
const inflightMemoryBytesMax = 64 * 1024 * 1024 * 1024;

/** `--max-inflight-memory SIZE`: at least 64M (a client's half must hold one 32 MiB request). */
export function parseInflightMemory(text: string): number {
  let bytes: number;
  try {
    bytes = parseSize(text);
  } catch (error) {
    throw new InvalidArgumentError((error as Error).message);
  }
  if (bytes < inflightMemoryBytesMin || bytes > inflightMemoryBytesMax) {
    throw new InvalidArgumentError(`expected a size from 64M to 64G, got ${JSON.stringify(text)}`);
  }
  return bytes;
}

export function addServeCommand(program: Command): void {
  program
    .command("serve")
    .description("run the blocksnap daemon in the foreground (NBD, FUSE when root, control socket)")
    .option(
      "--state-dir <dir>",
      "state directory (default: $BLOCKSNAP_STATE_DIR, /var/lib/blocksnap as root, else $XDG_STATE_HOME/blocksnap)",
    )
    .option("--socket <path>", "control socket (default: $BLOCKSNAP_SOCKET or <state dir>/blocksnap.sock)")
    .option("--nbd-socket <path>", "NBD Unix socket, or none (default: <state dir>/nbd.sock)")
    .option(
      "--nbd-listen <host:port>",
      "NBD over TCP, e.g. 127.0.0.1:10809 (default: none; a non-loopback address needs --insecure-no-tls)",
      parseListenAddress,
    )
    .option(
      "--metrics-listen <host:port>",
      "Prometheus metrics over TCP, GET /metrics only, unauthenticated: e.g. 127.0.0.1:9807 (default: none; the control socket always serves GET /metrics)",
      parseListenAddress,
    )
    .option(
      "--socket-group <group>",
      "open the control and NBD Unix sockets to this group (0660) instead of the daemon's user only (0600)",
    )
    .option(
      "--insecure-no-tls",
      "allow NBD over TCP on a non-loopback address without TLS (anyone who reaches it can write every export)",
    )
    .addOption(
      new Option(
        "--tls <mode>",
        "NBD over TLS: off, on (if the client asks) or require (default require when credentials are given)",
      ).choices(["off", "on", "require"]),
    )
    .option("--tls-cert <file>", "TLS server certificate (PEM), with --tls-key")
    .option("--tls-key <file>", "TLS server private key (PEM)")
    .option("--tls-ca <file>", "CA certificates (PEM) that sign client certificates")
    .option("--tls-verify-peer", "require a client certificate signed by --tls-ca")
    .option("--tls-psk <file>", "TLS pre-shared keys, psktool format (identity:hexkey per line)")
    .option(
      "--access <file>",
      "NBD access rules, one `IDENTITY EXPORT-GLOB ro|rw|none` per line (first match decides; reread on SIGHUP)",
    )
    .option(
      "--max-connections <n>",
      "NBD connections in all; more are closed at accept (default: 256)",
      parseConnectionLimit,
    )
    .option(
      "--max-connections-per-client <n>",
      "NBD connections of one client: a uid on the Unix socket, an IP address on TCP (default: 64)",
      parseConnectionLimit,
    )
    .option(
      "--max-inflight-memory <size>",
      "READ/WRITE data the NBD face holds at once, over all clients, a client at most half (default: 256M)",
      parseInflightMemory,
    )
    .option("--fuse-mount <dir>", "FUSE mount point, or none (default: <state dir>/mnt when root)")
    .option(
      "--supervise",
      "run the engine under a small supervisor that keeps the sockets and the FUSE mount through engine crashes and `blocksnap restart`",
    )
    .option(
      "--stop-wait <seconds>",
      "at SIGTERM, keep serving up to this long while file systems are mounted on our devices",
      parseStopWait,
      stopWaitSecondsDefault,
    )
    .addOption(
      new Option("--log-level <level>", "log level (change it at run time with `blocksnap log-level`)")
        .choices(logLevelNames)
        .default("info"),
    )
    .option(
      "--json",
      "log JSON lines on stdout, the start-up report first (default: JSON lines on stderr, human lines when stderr is a terminal)",
    )
    .addHelpText(
      "after",
      "\nExamples:\n  $ blocksnap serve\n  $ blocksnap serve --tls-psk /etc/blocksnap/keys.psk --access /etc/blocksnap/access.conf --nbd-listen 0.0.0.0:10809\n  $ blocksnap serve --socket-group backup --nbd-listen 127.0.0.1:10809\n  $ blocksnap serve --state-dir /tmp/bs --nbd-socket none --fuse-mount none\n  $ blocksnap serve --config /etc/blocksnap/blocksnap.conf --json\n",
    )
    .option(
      "--config <file>",
      `configuration file: serve's long options as key = value lines, flags win (default: ${defaultConfigPath} if it exists; none reads none)`,
    )
    .action(async (_flags: ServeOptions, command: Command) => {
      try {
        await loadConfigFile(command);
      } catch (error) {
        reportError(error, command.opts<ServeOptions>().json === true ? "line" : false);
        return;
      }
      const options = command.opts<ServeOptions>();
      const stateDir = resolveStateDir(options.stateDir, currentStateDirEnvironment());
      const socketFromEnv = process.env.BLOCKSNAP_SOCKET;
      const controlSocketPath =
        options.socket ??
        (socketFromEnv !== undefined && socketFromEnv !== "" ? socketFromEnv : controlSocketPathIn(stateDir));
      const nbdSocketPath =
        options.nbdSocket === "none" ? null : (options.nbdSocket ?? nbdSocketPathIn(stateDir));
      const nbdTcp =
        options.nbdListen === undefined || options.nbdListen === "none" ? null : options.nbdListen;
      const fuse =
        options.fuseMount === "none"
          ? null
          : {
              mountDir: options.fuseMount ?? fuseMountDirIn(stateDir),
              required: options.fuseMount !== undefined,
            };
      const json = options.json === true;
      const logger = createDaemonLogger(
        options.logLevel,
        chooseLogOutput(json, process.stderr.isTTY === true),
      );
      const { serveUntilSignal } = await import("../daemon/serve.js");
      const { resolveSocketGroup } = await import("../daemon/socket-access.js");
      const { EngineLink } = await import("../daemon/engine-link.js");
      let exitCode: number;
      try {
        const socketGroup =
          options.socketGroup === undefined ? null : resolveSocketGroup(options.socketGroup);
        const link = await EngineLink.fromEnvironment();
        if (options.supervise === true && link === null) {
          const { superviseEngine } = await import("../supervisor/supervisor.js");
          exitCode = await superviseEngine({
            stateDir,
            controlSocketPath,
            nbdSocketPath,
            nbdTcp,
            insecureNoTls: options.insecureNoTls === true || tlsRequired(options),
            socketAccess: { group: socketGroup },
            nbdActivationFd: socketActivationFd(),
            fuse,
            logger: logger.child({ role: "supervisor" }),
            engineArgv: process.argv.slice(1),
          });
          process.exit(exitCode);
        }
        exitCode = await serveUntilSignal({
          tls: {
            mode: options.tls,
            certFile: absoluteOrUndefined(options.tlsCert),
            keyFile: absoluteOrUndefined(options.tlsKey),
            caFile: absoluteOrUndefined(options.tlsCa),
            verifyPeer: options.tlsVerifyPeer === true,
            pskFile: absoluteOrUndefined(options.tlsPsk),
          },
          accessFile: absoluteOrUndefined(options.access) ?? null,
          ...(link === null ? {} : { supervised: link }),
          stateDir,
          controlSocketPath,
          nbdSocketPath,
          nbdTcp,
          metricsTcp:
            options.metricsListen === undefined || options.metricsListen === "none"
              ? null
              : options.metricsListen,
          insecureNoTls: options.insecureNoTls === true,
          socketAccess: { group: socketGroup },
          nbdActivationFd: socketActivationFd(),
          fuse,
          nbdLimits: {
            ...(options.maxConnections === undefined ? {} : { connectionsMax: options.maxConnections }),
            ...(options.maxConnectionsPerClient === undefined
              ? {}
              : { connectionsPerClientMax: options.maxConnectionsPerClient }),
            ...(options.maxInflightMemory === undefined
              ? {}
              : { inflightBudgetBytes: options.maxInflightMemory }),
          },
          stopWaitMs: options.stopWait * 1000,
          version: packageVersion(),
          logger,
          logLevel: levelControlOf(logger),
        });
      } catch (error) {
        logger.error({ err: (error as Error)?.message }, "blocksnap daemon failed to start");
        reportError(error, json ? "line" : false);
        exitCode = 1;
      }
      // The faces may leave handles (a FUSE worker, a lingering client socket): the daemon is done.
      process.exit(exitCode);
    });
}

/**
 * systemd socket activation (sd_listen_fds): a listening socket passed as fd 3 when LISTEN_PID names this
 * process and LISTEN_FDS ≥ 1 — how `nbdinfo -- [ blocksnap serve ]` and systemd .socket units start us.
 */
function socketActivationFd(): number | null {
  const listenPid = process.env.LISTEN_PID;
  const listenFds = Number.parseInt(process.env.LISTEN_FDS ?? "", 10);
  if (listenPid !== String(process.pid) || !(listenFds >= 1)) return null;
  return 3;
}

function absoluteOrUndefined(path: string | undefined): string | undefined {
  return path === undefined ? undefined : resolve(path);
}

/** What loadNbdTls will decide: require explicitly, or by default when credentials are given. */
function tlsRequired(options: ServeOptions): boolean {
  const hasCredentials = options.tlsCert !== undefined || options.tlsPsk !== undefined;
  return options.tls === "require" || (options.tls === undefined && hasCredentials);
}

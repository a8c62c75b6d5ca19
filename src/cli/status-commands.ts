/** `blocksnap status`, `metrics`, `restart` and `version`. */
import type { Command } from "commander";
import type { StatusView } from "../daemon/api-types.js";
import { CliError } from "./cli-error.js";
import { addCommonOptions, type CommonOptions, clientAction } from "./command-context.js";
import { deviceTable } from "./device-commands.js";
import { formatFields, writeJson, writeLine } from "./output.js";
import { snapshotTable } from "./snapshot-commands.js";
import { packageVersion } from "./version.js";

export function statusLines(status: StatusView): string[] {
  const tcp = status.nbd.tcp;
  const scheme = status.nbd.tls?.mode === "require" ? "nbds" : "nbd";
  const supervisor = status.supervisor;
  const lines = formatFields([
    ["daemon", `pid ${status.pid}, version ${status.version}`],
    ...(supervisor === undefined
      ? []
      : [
          [
            "supervisor",
            `pid ${supervisor.pid}, engine #${supervisor.engineNumber}, ${supervisor.restarts.length} unplanned restart(s)${
              supervisor.restarts.length === 0
                ? ""
                : `, last ${supervisor.restarts.at(-1)?.at}: ${supervisor.restarts.at(-1)?.cause}`
            }`,
          ] as [string, string],
        ]),
    ["state dir", status.stateDir],
    ["control", status.controlSocket],
    [
      "nbd unix",
      status.nbd.socketPath === null ? "off" : `${scheme}+unix:///<export>?socket=${status.nbd.socketPath}`,
    ],
    [
      "nbd tcp",
      tcp === null
        ? "off"
        : `${scheme}://${tcp.host.includes(":") ? `[${tcp.host}]` : tcp.host}:${tcp.port}/<export>`,
    ],
    ["nbd tls", tlsLine(status)],
    ["access rules", accessRulesLine(status)],
    ["fuse", status.fuse.mountDir ?? "off"],
    ...(status.logLevel === undefined ? [] : [["log level", status.logLevel] as [string, string]]),
  ]);
  lines.push("", "who can connect:");
  lines.push(...status.access.whoCanConnect.map((line) => `  ${line}`));
  lines.push("", "devices:");
  lines.push(...deviceTable(status).map((line) => `  ${line}`));
  const recoveries = Object.entries(status.cbtRecoveries ?? {});
  if (recoveries.length > 0) {
    lines.push("", "CBT at start:");
    lines.push(...recoveries.map(([name, outcome]) => `  ${name}: ${outcome}`));
  }
  const snapshotRecoveries = status.snapshotRecoveries ?? [];
  if (snapshotRecoveries.length > 0) {
    lines.push("", "snapshots at start:");
    lines.push(
      ...snapshotRecoveries.map(
        (recovery) =>
          `  ${recovery.id}: ${recovery.outcome} (${recovery.reason}), ${recovery.chunks} chunk(s)`,
      ),
    );
  }
  lines.push("", "snapshots:");
  lines.push(...snapshotTable(status.snapshots).map((line) => `  ${line}`));
  return lines;
}

function tlsLine(status: StatusView): string {
  const tls = status.nbd.tls;
  if (tls === undefined || tls.mode === "off") return "off";
  const kinds = tls.credentials.map((kind) => (kind === "x509" ? "X.509" : "PSK")).join(" + ");
  const how = tls.mode === "require" ? "required" : "offered, plain text allowed";
  return `${how} on every NBD listener (${kinds}${tls.verifyPeer ? ", client certificates verified" : ""})`;
}

function accessRulesLine(status: StatusView): string {
  const rules = status.accessRules;
  if (rules == null) return "none (every client that gets in may use every export)";
  return `${rules.rules} rule(s) from ${rules.file}, loaded ${rules.loadedAt}`;
}

export function addStatusCommands(program: Command): void {
  addCommonOptions(
    program.command("status").description("show the daemon, its sockets, devices and snapshots"),
  )
    .addHelpText("after", "\nExample:\n  $ blocksnap status --json\n")
    .action(
      clientAction<CommonOptions>(async ({ client, json }) => {
        const status = await client.get<StatusView>("/v1/status");
        if (json) return writeJson(status);
        for (const line of statusLines(status)) writeLine(line);
      }),
    );

  addCommonOptions(
    program
      .command("metrics")
      .description("print the daemon's Prometheus metrics (what GET /metrics answers; docs/metrics.md)"),
  )
    .addHelpText("after", "\nExample:\n  $ blocksnap metrics | grep blocksnap_io_bytes_total\n")
    .action(
      clientAction<CommonOptions>(async ({ client, json }) => {
        const text = (await client.getBinary("/metrics")).toString("utf8");
        if (json) return writeJson({ text });
        process.stdout.write(text);
      }),
    );

  addCommonOptions(
    program
      .command("restart")
      .description("restart the daemon's engine without unmounting anything (needs serve --supervise)")
      .option("--force", "restart even though snapshots exist (they are destroyed)"),
  )
    .addHelpText("after", "\nExample:\n  $ blocksnap restart\n")
    .action(
      clientAction<CommonOptions & { force?: boolean }>(async ({ client, json }, _args, options) => {
        const before = await client.post<{ enginePid: number }>("/v1/restart", {
          ...(options.force === true ? { force: true } : {}),
        });
        const after = await waitForNewEngine(() => client.get<StatusView>("/v1/status"), before.enginePid);
        if (json) return writeJson({ previousPid: before.enginePid, pid: after.pid, version: after.version });
        writeLine(`engine restarted: pid ${before.enginePid} → ${after.pid}, version ${after.version}`);
      }),
    );

  addCommonOptions(
    program
      .command("version")
      .description("print the version of this command and of the running daemon, if any"),
  )
    .addHelpText("after", "\nExample:\n  $ blocksnap version\n")
    .action(
      clientAction<CommonOptions>(async ({ client, json }) => {
        let daemon: { version: string; pid: number } | null = null;
        try {
          const status = await client.get<StatusView>("/v1/status");
          daemon = { version: status.version, pid: status.pid };
        } catch (error) {
          if (!(error instanceof CliError)) throw error;
        }
        if (json) return writeJson({ version: packageVersion(), daemon });
        writeLine(`blocksnap ${packageVersion()}`);
        writeLine(daemon === null ? "daemon: not running" : `daemon: ${daemon.version} (pid ${daemon.pid})`);
      }),
    );
}

const restartWaitMs = 60_000;
const restartPollMs = 100;

/** Polls status until a different engine answers; the requests in between wait in the supervisor's queue. */
async function waitForNewEngine(status: () => Promise<StatusView>, previousPid: number): Promise<StatusView> {
  const deadline = Date.now() + restartWaitMs;
  let lastError: unknown = null;
  while (Date.now() < deadline) {
    try {
      const current = await status();
      if (current.pid !== previousPid) return current;
    } catch (error) {
      lastError = error;
    }
    await new Promise((resolve) => setTimeout(resolve, restartPollMs));
  }
  throw new CliError(
    `no new engine answered within ${restartWaitMs / 1000} s${lastError === null ? "" : `: ${String(lastError)}`}`,
    { errno: "ETIMEDOUT" },
  );
}

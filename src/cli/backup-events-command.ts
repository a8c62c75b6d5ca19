/**
 * `blocksnap backup events [--since N] [--follow] [--job JOB]`: the daemon's backup and restore job events
 * (GET /v1/backups/events, backup-job-events.ts), each with its #seq, from the oldest the daemon keeps or
 * after cursor N. Without --follow it prints what is kept and ends; with it, it long-polls the daemon (the
 * answer comes when an event does: no polling) until Ctrl-C, or with --job until that job has ended.
 * --json prints one JSON line per event (`{"seq": …, "type": …}`) and `{"missed": n, "beforeSeq": s}` when
 * the daemon's bound dropped events before this reader got them (never silently).
 */
import type { Command } from "commander";
import type { BackupJobEventsView } from "../daemon/api-types.js";
import type { BackupJobEvent } from "../daemon/backup-job-events.js";
import { jobEventsKeptMax } from "../daemon/backup-job-events.js";
import { addCommonOptions, type CommonOptions, clientAction } from "./command-context.js";
import { countArgument } from "./option-parsers.js";
import { formatTimeMs, writeJsonLine, writeLine } from "./output.js";
import { formatSize } from "./units.js";

/** One long poll of --follow; the daemon answers earlier when an event comes. */
const followSliceMs = 30_000;

interface EventsOptions extends CommonOptions {
  readonly since?: number;
  readonly follow?: boolean;
  readonly job?: string;
}

type SequencedJobEvent = BackupJobEvent & { readonly seq: number };

export function addBackupEventsCommand(backup: Command): void {
  addCommonOptions(
    backup
      .command("events")
      .description(
        "print the daemon's backup and restore job events (started, finished, failed, cancelled) with their #seq",
      )
      .option(
        "--since <seq>",
        "after this event seq (the last one seen; default 0: from the oldest the daemon keeps)",
        countArgument("since", Number.MAX_SAFE_INTEGER),
      )
      .option("--follow", "wait for new events (until Ctrl-C, or with --job until the job has ended)")
      .option("--job <job>", "only this job's events (its id or a prefix)"),
  )
    .addHelpText(
      "after",
      "\nExamples:\n  $ blocksnap backup events\n  $ blocksnap backup events --follow --job 3f2a --json\n",
    )
    .action(
      clientAction<EventsOptions>(async ({ client, json }, _args, options) => {
        let cursor = options.since ?? 0;
        const timeoutMs = options.follow === true ? followSliceMs : 0;
        for (;;) {
          const view = await client.get<BackupJobEventsView>(
            `/v1/backups/events?since=${cursor}&timeoutMs=${timeoutMs}`,
          );
          cursor = view.nextSince;
          const event = view.event;
          if (event === null) {
            if (options.follow === true) continue;
            return;
          }
          if (view.missed > 0) {
            if (json) writeJsonLine({ missed: view.missed, beforeSeq: event.seq });
            else
              writeLine(
                `missed ${view.missed} event(s) before #${event.seq}: dropped, the daemon keeps the last ${jobEventsKeptMax}`,
              );
          }
          if (options.job !== undefined && !event.job.startsWith(options.job)) continue;
          if (json) writeJsonLine(event);
          else writeLine(formatJobEvent(event));
          if (options.follow === true && options.job !== undefined && event.type !== "started") return;
        }
      }),
    );
}

/** `#seq  time  type  kind device job=ID  details`. */
export function formatJobEvent(event: SequencedJobEvent): string {
  const head = `#${event.seq}  ${formatTimeMs(event.timeMs)}  ${event.type.padEnd(9)}  ${event.kind} ${event.device} job=${event.job}`;
  const seconds = (durationMs: number) => `${(durationMs / 1000).toFixed(1)}s`;
  switch (event.type) {
    case "started":
      return `${head}  ${event.level === null ? "" : `level=${event.level}: `}${event.reason}`;
    case "finished":
      return `${head}  ${event.backup}${event.level === null ? "" : ` level=${event.level}`} bytes=${formatSize(event.bytes)} new=${formatSize(event.newBytesStored)} in ${seconds(event.durationMs)}`;
    case "failed":
      return `${head}  ${event.message} (${event.errno}) after ${seconds(event.durationMs)}`;
    case "cancelled":
      return `${head}  after ${seconds(event.durationMs)}`;
  }
}

/**
 * `blocksnap snapshot create|add|append-storage|take|info|list|wait-event|watch|destroy`: the snapshot
 * life cycle (create → add devices → take → use the images → destroy) and its events.
 *
 * `watch` waits in 1-second slices (like blksnap's snapshot_watcher) and checks the state between them,
 * so it ends promptly when the snapshot is corrupted or destroyed, and an interrupted watch leaves at most
 * one short wait behind in the daemon.
 */

import type { Command } from "commander";
import { Option } from "commander";
import { eventsKeptMax, freezeTimeoutMsMax, waitEventTimeoutMsMax } from "../daemon/api-limits.js";
import type {
  DestroyedView,
  EventView,
  SequencedEventView,
  SnapshotEventView,
  SnapshotListView,
  SnapshotView,
  StorageInfoView,
  StorageView,
  TakeReportView,
} from "../daemon/api-types.js";
import { CliError } from "./cli-error.js";
import { absolutePath, addCommonOptions, type CommonOptions, clientAction } from "./command-context.js";
import type { ControlClient } from "./control-client.js";
import { collectArgument, countArgument, sizeArgument } from "./option-parsers.js";
import {
  formatFields,
  formatMs,
  formatTable,
  formatTimeMs,
  writeJson,
  writeJsonLine,
  writeLine,
} from "./output.js";
import { formatSize } from "./units.js";

const watchSliceMs = 1000;

interface CreateOptions extends CommonOptions {
  readonly storage: string;
  readonly limit: number;
  readonly device?: string[];
  readonly chunkSize?: number;
  readonly onCowError?: string;
  readonly growthPortion?: number;
  readonly preTake?: string;
  readonly postTake?: string;
  readonly force?: boolean;
}

interface TakeCommandOptions extends CommonOptions {
  /** false with --no-freeze */
  readonly freeze: boolean;
  readonly freezeTimeout?: number;
}

interface AddOptions extends CommonOptions {
  readonly device: string;
  readonly force?: boolean;
}

interface AppendStorageOptions extends CommonOptions {
  readonly storage: string;
  readonly size?: number;
  readonly force?: boolean;
}

const storageForceHelp =
  "accept a storage on a file system that lives on a member device (the take would hang in the freeze)";

interface WaitEventOptions extends CommonOptions {
  readonly timeout: number;
  readonly since?: number;
}

interface WatchOptions extends CommonOptions {
  readonly since?: number;
}

const sinceHelp = "read after this event seq (the last one seen; 0: from the oldest the daemon keeps)";

function snapshotPath(id: string, suffix = ""): string {
  return `/v1/snapshots/${encodeURIComponent(id)}${suffix}`;
}

export function formatStorage(storage: StorageInfoView): string {
  return `${storage.kind}  used ${formatSize(storage.usedBytes)} / capacity ${formatSize(storage.capacityBytes)} / limit ${formatSize(storage.limitBytes)}`;
}

/** An event as `wait-event` and `watch` print it: `#seq  time  type  details`. */
export function formatSequencedEvent(event: SequencedEventView): string {
  return `#${event.seq}  ${formatEvent(event)}`;
}

/** The line that says events were dropped for the log's bound before the reader got to them. */
export function formatMissed(missed: number, beforeSeq: number): string {
  return `missed ${missed} event(s) before #${beforeSeq}: dropped, the daemon keeps the last ${eventsKeptMax} per snapshot`;
}

export function formatEvent(event: SnapshotEventView): string {
  const time = formatTimeMs(event.timeMs);
  switch (event.type) {
    case "corrupted":
      return `${time}  corrupted  device=${event.device} errno=${event.errno}`;
    case "no_space":
      return `${time}  no_space   requested=${event.requestedBytes} (${formatSize(event.requestedBytes)})`;
    case "low_space":
      return `${time}  low_space  free=${event.freeBytes} (${formatSize(event.freeBytes)})`;
    case "io_error":
      return `${time}  io_error   errno=${event.errno} ${event.message}`;
  }
}

export function snapshotInfoLines(view: SnapshotView): string[] {
  const lines = formatFields([
    ["id", view.id],
    ["state", view.state],
    ["created", formatTimeMs(view.createdAtMs)],
    [
      "taken",
      view.takenAtMs === null
        ? "-"
        : `${formatTimeMs(view.takenAtMs)} (writes held ${formatMs(view.takeStallMs)})`,
    ],
    ["chunk size", formatSize(view.chunkSizeBytes)],
    ["on cow error", view.onCowError],
    ["storage", formatStorage(view.storage)],
  ]);
  for (const path of view.storage.paths) lines.push(`  storage path: ${path}`);
  lines.push(...hookLines(view.takeReport));
  for (const device of view.devices) {
    lines.push(`device ${device.name}:`);
    const fields: [string, string][] = [
      ["image", device.imageName ?? "- (not taken)"],
      ["size", formatSize(device.sizeBytes)],
      ["chunks stored", `${device.chunksStored}`],
      ["error", device.error ?? "-"],
      ...frozenFields(view, device.name),
    ];
    for (const uri of device.nbdUris) fields.push(["nbd", uri]);
    if (device.fusePath !== null) fields.push(["fuse", device.fusePath]);
    lines.push(...formatFields(fields, "  "));
  }
  return lines;
}

/** The pre-take and post-take hooks of the last take, when they were configured. */
export function hookLines(report: TakeReportView | null): string[] {
  const lines: string[] = [];
  if (report === null) return lines;
  for (const [name, hook] of [
    ["pre-take hook", report.preTake],
    ["post-take hook", report.postTake],
  ] as const) {
    if (hook === null) continue;
    const outcome = hook.timedOut ? "timed out" : `exit ${hook.exitCode ?? "?"}`;
    lines.push(`${name}: ${outcome} after ${formatMs(hook.durationMs)}: ${hook.command}`);
    const output = hook.output.trim();
    if (output) for (const line of output.split("\n")) lines.push(`  | ${line}`);
  }
  return lines;
}

/** What take froze on one device: a `frozen` field per mount, with how long or why it failed. */
export function frozenFields(view: SnapshotView, deviceName: string): [string, string][] {
  const report = view.takeReport;
  if (report === null) {
    return view.takenAtMs === null ? [] : [["frozen", "- (taken without freezing)"]];
  }
  const mounts = report.frozen.filter((mount) => mount.device === deviceName);
  if (mounts.length === 0) return [["frozen", "- (no mounted file system found)"]];
  return mounts.map((mount) => [
    "frozen",
    `${mount.mountPoint} (${mount.fsType} on ${mount.loopDevice}) ${
      mount.error === null
        ? `for ${formatMs(mount.frozenMs)} (the freeze took ${formatMs(mount.freezeMs)})`
        : `FAILED: ${mount.error}`
    }`,
  ]);
}

export function snapshotTable(snapshots: readonly SnapshotView[]): string[] {
  if (snapshots.length === 0) return ["no snapshots"];
  return formatTable(
    ["ID", "STATE", "DEVICES", "USED", "LIMIT"],
    snapshots.map((snapshot) => [
      snapshot.id,
      snapshot.state,
      snapshot.devices.map((device) => device.name).join(",") || "-",
      formatSize(snapshot.storage.usedBytes),
      formatSize(snapshot.storage.limitBytes),
    ]),
  );
}

export function addSnapshotCommands(program: Command): void {
  const snapshot = program
    .command("snapshot")
    .description("create, take, inspect and destroy snapshots")
    .addHelpText(
      "after",
      "\nExamples:\n  $ id=$(blocksnap snapshot create --device disk0 --storage /var/tmp --limit 1G)\n  $ blocksnap snapshot take $id\n  $ blocksnap snapshot destroy $id\n",
    );
  addCreateCommand(snapshot);
  addAddCommand(snapshot);
  addAppendStorageCommand(snapshot);
  addTakeCommand(snapshot);
  addInfoCommand(snapshot);
  addListCommand(snapshot);
  addWaitEventCommand(snapshot);
  addWatchCommand(snapshot);
  addDestroyCommand(snapshot);
}

function addCreateCommand(snapshot: Command): void {
  addCommonOptions(
    snapshot
      .command("create")
      .description("create a snapshot (prints its id); add devices, then take it")
      .requiredOption(
        "--storage <path>",
        "difference storage: a file, a directory (temp file), a block device, or memory:",
      )
      .requiredOption("--limit <size>", "the most the difference storage may grow to", sizeArgument)
      .option("--device <name...>", "devices to add now (repeatable)", collectArgument)
      .option(
        "--chunk-size <size>",
        "copy-before-write chunk, power of two 4K..64M (default 256K)",
        sizeArgument,
      )
      .addOption(
        new Option(
          "--on-cow-error <policy>",
          "when a chunk cannot be preserved (default break-snapshot)",
        ).choices(["break-snapshot", "fail-origin-write"]),
      )
      .option("--growth-portion <size>", "storage growth step (default 64M)", sizeArgument)
      .option("--pre-take <command>", "shell command the daemon runs before freezing file systems at take")
      .option(
        "--post-take <command>",
        "shell command the daemon runs after thawing them (also when take failed)",
      )
      .option("--force", storageForceHelp),
  )
    .addHelpText(
      "after",
      "\nExample:\n  $ blocksnap snapshot create --storage /var/tmp --limit 10G --device disk0 --device disk1\n",
    )
    .action(
      clientAction<CreateOptions>(async ({ client, json }, _args, options) => {
        const body: Record<string, unknown> = {
          storage: absolutePath(options.storage),
          limitBytes: options.limit,
        };
        if (options.device !== undefined) body.devices = options.device;
        if (options.chunkSize !== undefined) body.chunkSizeBytes = options.chunkSize;
        if (options.onCowError !== undefined) body.onCowError = options.onCowError;
        if (options.growthPortion !== undefined) body.growthPortionBytes = options.growthPortion;
        if (options.preTake !== undefined) body.preTakeCommand = options.preTake;
        if (options.postTake !== undefined) body.postTakeCommand = options.postTake;
        if (options.force === true) body.force = true;
        const view = await client.post<SnapshotView>("/v1/snapshots", body);
        if (json) return writeJson(view);
        writeLine(view.id);
      }),
    );
}

function addAddCommand(snapshot: Command): void {
  addCommonOptions(
    snapshot
      .command("add")
      .description("add a device to a snapshot that is not taken yet")
      .argument("<id>", "snapshot id")
      .requiredOption("--device <name>", "device name")
      .option("--force", storageForceHelp),
  )
    .addHelpText("after", "\nExample:\n  $ blocksnap snapshot add 6f1c0a52-... --device disk1\n")
    .action(
      clientAction<AddOptions>(async ({ client, json }, [id], options) => {
        const view = await client.post<SnapshotView>(snapshotPath(id!, "/devices"), {
          device: options.device,
          ...(options.force === true ? { force: true } : {}),
        });
        if (json) return writeJson(view);
        writeLine(`added ${options.device} to ${view.id}`);
      }),
    );
}

function addAppendStorageCommand(snapshot: Command): void {
  addCommonOptions(
    snapshot
      .command("append-storage")
      .description("give a snapshot more difference storage")
      .argument("<id>", "snapshot id")
      .requiredOption("--storage <path>", "a file, a directory (temp file), a block device, or memory:")
      .option(
        "--size <size>",
        "size of the file to create or extend (a block device is used whole)",
        sizeArgument,
      )
      .option("--force", storageForceHelp),
  )
    .addHelpText(
      "after",
      "\nExample:\n  $ blocksnap snapshot append-storage 6f1c0a52-... --storage /mnt/spare/diff1 --size 4G\n",
    )
    .action(
      clientAction<AppendStorageOptions>(async ({ client, json }, [id], options) => {
        const body: Record<string, unknown> = { storage: absolutePath(options.storage) };
        if (options.size !== undefined) body.sizeBytes = options.size;
        if (options.force === true) body.force = true;
        const view = await client.post<StorageView>(snapshotPath(id!, "/storage"), body);
        if (json) return writeJson(view);
        writeLine(`storage: ${formatStorage(view.storage)}`);
      }),
    );
}

function addTakeCommand(snapshot: Command): void {
  addCommonOptions(
    snapshot
      .command("take")
      .description("take the snapshot: images appear, one per device")
      .argument("<id>", "snapshot id")
      .option("--no-freeze", "do not freeze the file systems mounted on the devices, and run no hooks")
      .option(
        "--freeze-timeout <ms>",
        "bound for each freeze, thaw and hook, in milliseconds (default 30000)",
        countArgument("freeze timeout", freezeTimeoutMsMax),
      ),
  )
    .addHelpText("after", "\nExample:\n  $ blocksnap snapshot take 6f1c0a52-...\n")
    .action(
      clientAction<TakeCommandOptions>(async ({ client, json }, [id], options) => {
        const body: Record<string, unknown> = {};
        if (!options.freeze) body.noFreeze = true;
        if (options.freezeTimeout !== undefined) body.freezeTimeoutMs = options.freezeTimeout;
        const view = await client.post<SnapshotView>(snapshotPath(id!, "/take"), body);
        if (json) return writeJson(view);
        writeLine(`taken ${view.id} (writes held ${formatMs(view.takeStallMs)})`);
        for (const line of hookLines(view.takeReport)) writeLine(line);
        for (const device of view.devices) {
          writeLine(`  ${device.imageName ?? device.name}  ${device.nbdUris[0] ?? ""}`.trimEnd());
          for (const line of formatFields(frozenFields(view, device.name), "    ")) writeLine(line);
        }
      }),
    );
}

function addInfoCommand(snapshot: Command): void {
  addCommonOptions(
    snapshot
      .command("info")
      .description("show a snapshot, its storage and its images")
      .argument("<id>", "snapshot id"),
  )
    .addHelpText("after", "\nExample:\n  $ blocksnap snapshot info 6f1c0a52-...\n")
    .action(
      clientAction<CommonOptions>(async ({ client, json }, [id]) => {
        const view = await client.get<SnapshotView>(snapshotPath(id!));
        if (json) return writeJson(view);
        for (const line of snapshotInfoLines(view)) writeLine(line);
      }),
    );
}

function addListCommand(snapshot: Command): void {
  addCommonOptions(snapshot.command("list").description("list snapshots"))
    .addHelpText("after", "\nExample:\n  $ blocksnap snapshot list\n")
    .action(
      clientAction<CommonOptions>(async ({ client, json }) => {
        const view = await client.get<SnapshotListView>("/v1/snapshots");
        if (json) return writeJson(view);
        for (const line of snapshotTable(view.snapshots)) writeLine(line);
      }),
    );
}

function addWaitEventCommand(snapshot: Command): void {
  addCommonOptions(
    snapshot
      .command("wait-event")
      .description(
        "wait for the snapshot's next event (after --since SEQ, else the next no other cursor-less caller got); prints it with its #seq, or `timeout`",
      )
      .argument("<id>", "snapshot id")
      .requiredOption(
        "--timeout <ms>",
        `how long to wait, in milliseconds (at most ${waitEventTimeoutMsMax})`,
        countArgument("timeout", waitEventTimeoutMsMax),
      )
      .option("--since <seq>", sinceHelp, countArgument("since", Number.MAX_SAFE_INTEGER)),
  )
    .addHelpText(
      "after",
      "\nExample:\n  $ blocksnap snapshot wait-event 6f1c0a52-... --timeout 5000 --since 0\n",
    )
    .action(
      clientAction<WaitEventOptions>(async ({ client, json }, [id], options) => {
        const since = options.since === undefined ? "" : `&since=${options.since}`;
        const view = await client.get<EventView>(
          snapshotPath(id!, `/event?timeoutMs=${options.timeout}${since}`),
        );
        if (json) return writeJson(view);
        if (view.event === null) return writeLine("timeout");
        if (view.missed > 0) writeLine(formatMissed(view.missed, view.event.seq));
        writeLine(formatSequencedEvent(view.event));
      }),
    );
}

function addWatchCommand(snapshot: Command): void {
  addCommonOptions(
    snapshot
      .command("watch")
      .description(
        "print the snapshot's events, from the oldest kept (or after --since SEQ), until it is corrupted or destroyed",
      )
      .argument("<id>", "snapshot id")
      .option("--since <seq>", sinceHelp, countArgument("since", Number.MAX_SAFE_INTEGER)),
  )
    .addHelpText("after", "\nExample:\n  $ blocksnap snapshot watch 6f1c0a52-... --json --since 12\n")
    .action(
      clientAction<WatchOptions>(async ({ client, json }, [id], options) => {
        const end = await watch(client, id!, options.since ?? 0, {
          onStart: () => (json ? undefined : writeLine(`watching snapshot ${id}`)),
          onEvent: (event) => (json ? writeJsonLine({ event }) : writeLine(formatSequencedEvent(event))),
          onMissed: (missed, beforeSeq) =>
            json ? writeJsonLine({ missed, beforeSeq }) : writeLine(formatMissed(missed, beforeSeq)),
        });
        if (json) writeJsonLine({ end });
        else writeLine(`snapshot ${id} ${end}`);
      }),
    );
}

function addDestroyCommand(snapshot: Command): void {
  addCommonOptions(
    snapshot
      .command("destroy")
      .description("destroy a snapshot and its images (refused while an image is in use, unless --force)")
      .argument("<id>", "snapshot id")
      .option("--force", "destroy even while an image is open through a loop device or mounted"),
  )
    .addHelpText("after", "\nExample:\n  $ blocksnap snapshot destroy 6f1c0a52-...\n")
    .action(
      clientAction<CommonOptions & { force?: boolean }>(async ({ client, json }, [id], options) => {
        const query = options.force ? "?force=true" : "";
        const view = await client.delete<DestroyedView>(`${snapshotPath(id!)}${query}`);
        if (json) return writeJson(view);
        writeLine(`destroyed ${view.destroyed}`);
      }),
    );
}

interface WatchHandlers {
  readonly onStart: () => void;
  readonly onEvent: (event: SequencedEventView) => void;
  /** Events dropped for the log's bound before this watch read them (never silently skipped). */
  readonly onMissed: (missed: number, beforeSeq: number) => void;
}

/**
 * Prints events after cursor `since` until the snapshot is corrupted ("corrupted") or gone ("destroyed").
 * The watch follows its own cursor, so it shares nothing with other readers and misses nothing.
 */
async function watch(
  client: ControlClient,
  id: string,
  since: number,
  handlers: WatchHandlers,
): Promise<"corrupted" | "destroyed"> {
  const { onStart, onEvent, onMissed } = handlers;
  let cursor = since;
  const gone = (error: unknown): boolean => error instanceof CliError && error.errno === "ESRCH";
  // A snapshot id that never existed is an error, not a snapshot that was destroyed while watched.
  await client.get<SnapshotView>(snapshotPath(id));
  onStart();
  for (;;) {
    let view: EventView;
    try {
      view = await client.get<EventView>(
        snapshotPath(id, `/event?timeoutMs=${watchSliceMs}&since=${cursor}`),
      );
    } catch (error) {
      if (gone(error)) return "destroyed";
      throw error;
    }
    cursor = view.nextSince;
    if (view.event !== null) {
      if (view.missed > 0) onMissed(view.missed, view.event.seq);
      onEvent(view.event);
      if (view.event.type === "corrupted") return "corrupted";
      continue;
    }
    try {
      const info = await client.get<SnapshotView>(snapshotPath(id));
      if (info.state === "corrupted") return "corrupted";
      if (info.state === "destroyed") return "destroyed";
    } catch (error) {
      if (gone(error)) return "destroyed";
      throw error;
    }
  }
}

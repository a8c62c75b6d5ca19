/**
 * Events every watcher sees (issue 17), through the real daemon and CLI: a small memory: storage filled by
 * origin writes (qemu-io over NBD) produces low_space, no_space and corrupted events. Two `snapshot watch`
 * clients and a third that is killed after its first event and started again with `--since` (its last seq)
 * all see the same complete list: seqs 1…N without a gap, nothing missed, ending with `corrupted`. A
 * cursor-less `wait-event` still hands each event out once (blksnap-style), and a cursor reads them all
 * again. The daemon logs every event (corrupted at error level, low_space at warn).
 */
import assert from "node:assert/strict";
import { mkdtemp, rm } from "node:fs/promises";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { after, before, test } from "node:test";
import type { EventView, SequencedEventView } from "../../src/daemon/api-types.js";
import { which } from "../helpers/commands.js";
import { BackgroundCli, DaemonProcess, runCommand } from "./cli-harness.js";

let directory = "";
let daemon: DaemonProcess;

before(async () => {
  directory = await mkdtemp(join(tmpdir(), "blocksnap-event-watchers-"));
  daemon = await DaemonProcess.start(join(directory, "state"));
  await daemon.cliOk(["device", "add", "w0", "--backend", join(directory, "w0.img"), "--size", "8M"]);
});

after(async () => {
  await daemon?.stop();
  await rm(directory, { recursive: true, force: true });
});

async function qemuWrite(pattern: string, offset: string, length: string): Promise<void> {
  const uri = `nbd+unix:///w0?socket=${daemon.nbdSocket}`;
  const result = await runCommand("qemu-io", [
    "-f",
    "raw",
    uri,
    "-c",
    `write -P ${pattern} ${offset} ${length}`,
  ]);
  assert.equal(result.code, 0, result.stdout + result.stderr);
}

interface WatchLine {
  readonly event?: SequencedEventView;
  readonly missed?: number;
  readonly end?: string;
}

function watchLines(stdout: string): WatchLine[] {
  return stdout
    .split("\n")
    .filter((line) => line.length > 0)
    .map((line) => JSON.parse(line) as WatchLine);
}

function watcher(id: string, ...more: string[]): BackgroundCli {
  return new BackgroundCli(["snapshot", "watch", id, "--json", "--state-dir", daemon.stateDir, ...more]);
}

async function finished(watch: BackgroundCli): Promise<WatchLine[]> {
  const result = await watch.closed;
  assert.equal(result.code, 0, result.stderr);
  return watchLines(result.stdout);
}

void test("two watchers and one that reconnects with --since see the same complete event list", async (t) => {
  if (!which("qemu-io")) return t.skip("needs qemu-io (qemu-utils)");
  const id = (
    await daemon.cliOk([
      "snapshot",
      "create",
      "--storage",
      "memory:",
      "--limit",
      "1M",
      "--chunk-size",
      "64K",
      "--growth-portion",
      "256K",
      "--device",
      "w0",
    ])
  ).trim();
  await daemon.cliOk(["snapshot", "take", id]);
  const first = watcher(id);
  const second = watcher(id);
  const reconnecting = watcher(id);

  // Phase 1: a few chunks, within the limit: the storage grows (low_space), nothing breaks.
  await qemuWrite("0x11", "0", "256K");
  await reconnecting.waitForOutput('"seq":1');
  reconnecting.kill("SIGKILL");
  const beforeKill = watchLines((await reconnecting.closed).stdout).filter(
    (line) => line.event !== undefined,
  );
  assert.ok(beforeKill.length >= 1, "the killed watcher saw an event first");
  const lastSeq = beforeKill.at(-1)!.event!.seq;

  // Phase 2, while it is away: the storage overflows (no_space, then corrupted).
  await qemuWrite("0x22", "0", "4M");
  const resumed = watcher(id, "--since", String(lastSeq));
  const lists = [
    await finished(first),
    await finished(second),
    [...beforeKill, ...(await finished(resumed))],
  ];

  const [reference] = lists;
  const events = reference!.flatMap((line) => (line.event === undefined ? [] : [line.event]));
  const types = events.map((event) => event.type);
  assert.ok(types.includes("low_space") && types.includes("no_space"), `events: ${types}`);
  assert.equal(types.at(-1), "corrupted");
  assert.deepEqual(
    events.map((event) => event.seq),
    events.map((_event, index) => index + 1),
    "seqs 1…N, nothing missing",
  );
  for (const [index, lines] of lists.entries()) {
    assert.ok(!lines.some((line) => line.missed !== undefined), `watcher ${index} missed nothing`);
    assert.deepEqual(
      lines.filter((line) => line.event !== undefined),
      events.map((event) => ({ event })),
      `watcher ${index} saw the same list`,
    );
    assert.deepEqual(lines.at(-1), { end: "corrupted" }, `watcher ${index}`);
  }

  // A cursor reads any of them again; cursor-less wait-event hands each out once, in order.
  const again = await daemon.cliJson<EventView>([
    "snapshot",
    "wait-event",
    id,
    "--timeout",
    "0",
    "--since",
    "1",
  ]);
  assert.deepEqual(again, { event: events[1], nextSince: 2, missed: 0 });
  const handedOut: number[] = [];
  for (let index = 0; index <= events.length; index++) {
    const view = await daemon.cliJson<EventView>(["snapshot", "wait-event", id, "--timeout", "0"]);
    if (view.event === null) break;
    handedOut.push(view.event.seq);
  }
  assert.deepEqual(
    handedOut,
    events.map((event) => event.seq),
  );
  assert.equal((await daemon.cliOk(["snapshot", "wait-event", id, "--timeout", "0"])).trim(), "timeout");
  const human = await daemon.cliOk(["snapshot", "wait-event", id, "--timeout", "0", "--since", "0"]);
  assert.match(human, /^#1 {2}\S+ {2}low_space/);
  const beyond = await daemon.cli([
    "snapshot",
    "wait-event",
    id,
    "--timeout",
    "0",
    "--since",
    String(events.length + 1),
  ]);
  assert.equal(beyond.code, 1);
  assert.match(beyond.stderr, /beyond the newest event.*\(EINVAL\)/);

  // The daemon logged every event: corrupted at error level (50), low_space at warn (40).
  assert.match(daemon.stderr, new RegExp(`"level":50[^\\n]*"snapshot":"${id}"[^\\n]*"type":"corrupted"`));
  assert.match(daemon.stderr, new RegExp(`"level":40[^\\n]*"snapshot":"${id}"[^\\n]*"type":"low_space"`));
  await daemon.cliOk(["snapshot", "destroy", id]);
});

/**
 * Difference storage overflow through the real binary: a 1 MiB limit, origin writes through NBD
 * (qemu-io) that need more, then `no_space` followed by `corrupted` with ENOSPC, seen by `wait-event`
 * (snapshot A) and by `watch` (snapshot B); the origin keeps every byte written; the image fails with
 * EIO; destroy works; `watch` also ends when a snapshot is destroyed.
 */
import assert from "node:assert/strict";
import { mkdtemp, rm } from "node:fs/promises";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { after, before, test } from "node:test";
import type { EventView, SnapshotEventView, SnapshotView } from "../../src/daemon/api-types.js";
import { which } from "../helpers/commands.js";
import { BackgroundCli, DaemonProcess, runCommand } from "./cli-harness.js";

const eventsMax = 16;
let directory = "";
let daemon: DaemonProcess;

before(async () => {
  directory = await mkdtemp(join(tmpdir(), "blocksnap-cli-overflow-"));
  daemon = await DaemonProcess.start(join(directory, "state"));
  for (const name of ["o1", "o2"]) {
    await daemon.cliOk(["device", "add", name, "--backend", join(directory, `${name}.img`), "--size", "8M"]);
  }
});

after(async () => {
  await daemon?.stop();
  await rm(directory, { recursive: true, force: true });
});

function originUri(name: string): string {
  return `nbd+unix:///${name}?socket=${daemon.nbdSocket}`;
}

async function qemuIo(uri: string, ...commands: string[]): Promise<{ code: number | null; output: string }> {
  const result = await runCommand("qemu-io", [
    "-f",
    "raw",
    uri,
    ...commands.flatMap((command) => ["-c", command]),
  ]);
  return { code: result.code, output: result.stdout + result.stderr };
}

async function createSmallSnapshot(device: string): Promise<string> {
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
      "--device",
      device,
    ])
  ).trim();
  await daemon.cliOk(["snapshot", "take", id]);
  return id;
}

void test("overflow: no_space then corrupted (ENOSPC) by wait-event; origin intact; image EIO; destroy", async (t) => {
  if (!which("qemu-io")) return t.skip("needs qemu-io (qemu-utils)");
  assert.equal((await qemuIo(originUri("o1"), "write -P 0x11 0 8M")).code, 0);
  const id = await createSmallSnapshot("o1");

  const write = await qemuIo(originUri("o1"), "write -P 0x22 0 4M");
  assert.equal(write.code, 0, write.output);

  const events: SnapshotEventView[] = [];
  for (let index = 0; index < eventsMax; index++) {
    const view = await daemon.cliJson<EventView>(["snapshot", "wait-event", id, "--timeout", "5000"]);
    assert.notEqual(view.event, null, `no corrupted event after ${JSON.stringify(events)}`);
    events.push(view.event!);
    if (view.event!.type === "corrupted") break;
  }
  const types = events.map((event) => event.type);
  assert.ok(types.includes("no_space"), `events: ${types}`);
  assert.ok(types.indexOf("no_space") < types.indexOf("corrupted"), `events: ${types}`);
  assert.deepEqual(
    events.filter((event) => event.type === "corrupted").map((event) => [event.device, event.errno]),
    [["o1", "ENOSPC"]],
  );
  assert.equal((await daemon.cliOk(["snapshot", "wait-event", id, "--timeout", "0"])).trim(), "timeout");

  const info = await daemon.cliJson<SnapshotView>(["snapshot", "info", id]);
  assert.equal(info.state, "corrupted");
  assert.equal(info.devices[0]?.error, "ENOSPC");
  assert.ok(info.storage.usedBytes <= info.storage.limitBytes);

  const origin = await qemuIo(originUri("o1"), "read -P 0x22 0 4M", "read -P 0x11 4M 4M");
  assert.equal(origin.code, 0, origin.output);
  assert.doesNotMatch(origin.output, /fail/i);
  const image = await qemuIo(`nbd+unix:///o1@${id}?socket=${daemon.nbdSocket}`, "read 0 64K");
  assert.notEqual(image.code, 0);
  assert.match(image.output, /Input\/output error/);

  assert.match(await daemon.cliOk(["snapshot", "destroy", id]), /destroyed/);
  assert.equal((await daemon.cliJson<{ devices: unknown[] }>(["device", "list"])).devices.length, 2);
});

void test("overflow seen by watch: events printed until corrupted; watch also ends on destroy", async (t) => {
  if (!which("qemu-io")) return t.skip("needs qemu-io (qemu-utils)");
  const id = await createSmallSnapshot("o2");
  const watcher = new BackgroundCli(["snapshot", "watch", id, "--json", "--state-dir", daemon.stateDir]);
  const write = await qemuIo(originUri("o2"), "write -P 0x33 0 4M");
  assert.equal(write.code, 0, write.output);
  const watched = await watcher.closed;
  assert.equal(watched.code, 0, watched.stderr);
  const watchOutput = watched.stdout;
  const lines = watchOutput
    .trim()
    .split("\n")
    .map((line) => JSON.parse(line) as { event?: SnapshotEventView; end?: string });
  const types = lines.flatMap((line) => (line.event === undefined ? [] : [line.event.type]));
  assert.ok(types.includes("no_space") && types.at(-1) === "corrupted", `watch printed ${watchOutput}`);
  assert.deepEqual(lines.at(-1), { end: "corrupted" });
  const corrupted = lines.at(-2)?.event;
  assert.ok(corrupted?.type === "corrupted" && corrupted.errno === "ENOSPC" && corrupted.device === "o2");
  assert.equal((await qemuIo(originUri("o2"), "read -P 0x33 0 4M")).code, 0);
  await daemon.cliOk(["snapshot", "destroy", id]);

  // A watched snapshot that is destroyed ends the watch too (human output).
  const quiet = (
    await daemon.cliOk(["snapshot", "create", "--storage", "memory:", "--limit", "1M", "--device", "o2"])
  ).trim();
  const humanWatch = new BackgroundCli(["snapshot", "watch", quiet, "--state-dir", daemon.stateDir]);
  // Destroy only once the watch has seen the snapshot (its first line), else it would rightly say "not found".
  await humanWatch.waitForOutput("watching snapshot");
  await daemon.cliOk(["snapshot", "destroy", quiet]);
  const ended = await humanWatch.closed;
  assert.equal(ended.code, 0, ended.stderr);
  assert.match(ended.stdout, new RegExp(`^watching snapshot ${quiet}\\nsnapshot ${quiet} destroyed\\n$`));
});

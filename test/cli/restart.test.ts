/**
 * Daemon life cycle through the real binary: devices come back after a restart (an absent backend is
 * listed as unavailable and can be removed), a second daemon on the same state directory refuses to
 * start, stale lock and socket files left by a SIGKILLed daemon do not block the next start, and a busy
 * NBD TCP port fails the start with one clear line.
 */
import assert from "node:assert/strict";
import { mkdtemp, rm, stat } from "node:fs/promises";
import { createServer } from "node:net";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { after, before, test } from "node:test";
import type { DeviceListView } from "../../src/daemon/api-types.js";
import { DaemonProcess, runCli } from "./cli-harness.js";

let directory = "";
const daemons: DaemonProcess[] = [];

before(async () => {
  directory = await mkdtemp(join(tmpdir(), "blocksnap-cli-restart-"));
});

after(async () => {
  for (const daemon of daemons) await daemon.stop("SIGKILL");
  await rm(directory, { recursive: true, force: true });
});

async function start(stateDir: string): Promise<DaemonProcess> {
  const daemon = await DaemonProcess.start(stateDir);
  daemons.push(daemon);
  return daemon;
}

void test("devices come back after SIGKILL; stale files do not block; a second daemon refuses", async () => {
  const stateDir = join(directory, "a");
  const first = await start(stateDir);
  await first.cliOk(["device", "add", "f0", "--backend", join(directory, "f0.img"), "--size", "1M"]);
  await first.cliOk(["device", "add", "m0", "--backend", "memory:", "--size", "2M"]);
  await first.cliOk(["device", "add", "gone", "--backend", join(directory, "gone.img"), "--size", "1M"]);
  const before = await first.cliJson<DeviceListView>(["device", "list"]);

  const second = await runCli([
    "serve",
    "--state-dir",
    stateDir,
    "--nbd-listen",
    "none",
    "--fuse-mount",
    "none",
  ]);
  assert.equal(second.code, 1);
  assert.match(
    second.stderr,
    new RegExp(`^blocksnap: another blocksnap daemon \\(pid ${first.pid}\\) holds`, "m"),
  );
  assert.equal(
    (await first.cliJson<DeviceListView>(["device", "list"])).devices.length,
    3,
    "first daemon still serves",
  );

  assert.equal((await first.stop("SIGKILL")).signal, "SIGKILL");
  await stat(join(stateDir, "blocksnap.sock"));
  await stat(join(stateDir, "blocksnap.lock"));
  await rm(join(directory, "gone.img"));

  const third = await start(stateDir);
  const after = await third.cliJson<DeviceListView>(["device", "list"]);
  assert.deepEqual(
    after.devices.map((device) => [device.name, device.sizeBytes, device.backendPath]),
    [
      ["f0", 1024 * 1024, join(directory, "f0.img")],
      ["m0", 2 * 1024 * 1024, "memory:"],
    ],
  );
  for (const device of after.devices) {
    const previous = before.devices.find((candidate) => candidate.name === device.name);
    if (device.name === "m0") {
      // A memory: device comes back empty: a new generation, and the reason says why.
      assert.notEqual(device.cbt.generationId, previous?.cbt.generationId);
      assert.match(device.cbt.generationReason, /^untrusted: memory: devices come back empty$/);
    } else {
      // A file device keeps its generation through kill -9: the write-intent journal (cbt-keeper.ts).
      assert.equal(device.cbt.generationId, previous?.cbt.generationId, "kill -9 keeps the CBT generation");
    }
  }
  assert.deepEqual(
    after.devicesUnavailable.map((device) => [device.name, device.error.errno]),
    [["gone", "ENOENT"]],
  );
  assert.match(await third.cliOk(["device", "list"]), /^gone\s+\?.*unavailable/m);
  await third.cliOk(["device", "remove", "gone"]);
  assert.deepEqual((await third.cliJson<DeviceListView>(["device", "list"])).devicesUnavailable, []);
  assert.equal((await third.stop()).code, 0);
});

void test("a busy NBD TCP port fails the start with one clear line and leaves no lock behind", async () => {
  const blocker = createServer();
  await new Promise<void>((resolve) => blocker.listen(0, "127.0.0.1", resolve));
  const { port } = blocker.address() as { port: number };
  try {
    const stateDir = join(directory, "b");
    const result = await runCli([
      "serve",
      "--state-dir",
      stateDir,
      "--nbd-listen",
      `127.0.0.1:${port}`,
      "--fuse-mount",
      "none",
    ]);
    assert.equal(result.code, 1);
    const messages = result.stderr.split("\n").filter((line) => line.startsWith("blocksnap: "));
    assert.deepEqual(messages.length, 1, result.stderr);
    assert.match(messages[0]!, new RegExp(`127\\.0\\.0\\.1:${port} is already in use`));
    await assert.rejects(stat(join(stateDir, "blocksnap.lock")), { code: "ENOENT" });
    const daemon = await start(stateDir);
    assert.equal((await daemon.stop()).code, 0);
  } finally {
    blocker.close();
  }
});

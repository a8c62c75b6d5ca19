/**
 * The basic flow through the real binary: two devices, a snapshot of both, images reachable by the URIs
 * that `snapshot info` prints (checked with qemu-io and nbdinfo), destroy.
 */
import assert from "node:assert/strict";
import { mkdtemp, rm } from "node:fs/promises";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { after, before, test } from "node:test";
import type {
  DeviceListView,
  SnapshotListView,
  SnapshotView,
  StatusView,
} from "../../src/daemon/api-types.js";
import { which } from "../helpers/commands.js";
import { DaemonProcess, runCommand } from "./cli-harness.js";

const uuidPattern = /^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$/;
let directory = "";
let daemon: DaemonProcess;

before(async () => {
  directory = await mkdtemp(join(tmpdir(), "blocksnap-cli-two-"));
  daemon = await DaemonProcess.start(join(directory, "state"), {
    args: ["--nbd-listen", "127.0.0.1:0", "--fuse-mount", "none"],
  });
});

after(async () => {
  await daemon?.stop();
  await rm(directory, { recursive: true, force: true });
});

async function qemuIo(uri: string, ...commands: string[]): Promise<void> {
  const args = ["-f", "raw", uri, ...commands.flatMap((command) => ["-c", command])];
  const result = await runCommand("qemu-io", args);
  assert.equal(result.code, 0, `qemu-io ${args.join(" ")}: ${result.stdout}${result.stderr}`);
  assert.doesNotMatch(result.stdout, /failed/i);
}

void test("two devices: create, take, info shows both images with URIs and paths, images serve the old data, destroy", async (t) => {
  if (!which("qemu-io") || !which("nbdinfo"))
    return t.skip("needs qemu-io and nbdinfo (qemu-utils, libnbd-bin)");
  const added = await daemon.cliJson<{ name: string; sizeBytes: number; nbdUris: string[] }>([
    "device",
    "add",
    "disk0",
    "--backend",
    join(directory, "disk0.img"),
    "--size",
    "4M",
  ]);
  assert.equal(added.sizeBytes, 4 * 1024 * 1024);
  assert.equal(added.nbdUris[0], `nbd+unix:///disk0?socket=${daemon.nbdSocket}`);
  const humanAdd = await daemon.cliOk(["device", "add", "disk1", "--backend", "memory:", "--size", "2M"]);
  assert.match(humanAdd, /^added disk1 \(2 MiB\)$/m);

  await qemuIo(added.nbdUris[0]!, "write -P 0xaa 0 4M");
  await qemuIo(`nbd+unix:///disk1?socket=${daemon.nbdSocket}`, "write -P 0xcc 0 2M");

  const id = (
    await daemon.cliOk([
      "snapshot",
      "create",
      "--storage",
      directory,
      "--limit",
      "64M",
      "--device",
      "disk0",
      "disk1",
    ])
  ).trim();
  assert.match(id, uuidPattern);
  const taken = await daemon.cliOk(["snapshot", "take", id]);
  assert.match(taken, new RegExp(`disk0@${id}`));

  // Overwrite both origins after the take: the images must keep the old bytes.
  await qemuIo(added.nbdUris[0]!, "write -P 0xbb 0 4M");
  await qemuIo(`nbd+unix:///disk1?socket=${daemon.nbdSocket}`, "write -P 0xdd 0 1M");

  const info = await daemon.cliJson<SnapshotView>(["snapshot", "info", id]);
  assert.equal(info.state, "taken");
  assert.deepEqual(
    info.devices.map((device) => device.name),
    ["disk0", "disk1"],
  );
  for (const device of info.devices) {
    const exportName = `${device.name}@${id}`;
    assert.equal(device.imageName, exportName);
    assert.equal(device.error, null);
    assert.equal(device.nbdUris[0], `nbd+unix:///${exportName}?socket=${daemon.nbdSocket}`);
    assert.match(device.nbdUris[1] ?? "", new RegExp(`^nbd://127\\.0\\.0\\.1:\\d+/${exportName}$`));
    assert.equal(device.fusePath, null);
  }
  const human = await daemon.cliOk(["snapshot", "info", id]);
  for (const device of info.devices) {
    for (const uri of device.nbdUris) assert.ok(human.includes(uri), `human info lacks ${uri}:\n${human}`);
  }

  await qemuIo(info.devices[0]!.nbdUris[0]!, "read -P 0xaa 0 4M");
  await qemuIo(info.devices[1]!.nbdUris[1]!, "read -P 0xcc 0 2M");
  const nbdinfo = await runCommand("nbdinfo", ["--size", info.devices[1]!.nbdUris[1]!]);
  assert.equal(nbdinfo.stdout.trim(), String(2 * 1024 * 1024), nbdinfo.stderr);

  const list = await daemon.cliJson<SnapshotListView>(["snapshot", "list"]);
  assert.deepEqual(
    list.snapshots.map((snapshot) => snapshot.id),
    [id],
  );
  const status = await daemon.cliJson<StatusView>(["status"]);
  assert.equal(status.pid, daemon.pid);
  assert.equal(status.snapshots.length, 1);
  assert.match(await daemon.cliOk(["status"]), new RegExp(`${id}\\s+taken\\s+disk0,disk1`));

  assert.match(await daemon.cliOk(["snapshot", "destroy", id]), new RegExp(`destroyed ${id}`));
  assert.match(await daemon.cliOk(["snapshot", "list"]), /no snapshots/);
  const devices = await daemon.cliJson<DeviceListView>(["device", "list"]);
  assert.deepEqual(
    devices.devices.map((device) => [device.name, device.snapshotId]),
    [
      ["disk0", null],
      ["disk1", null],
    ],
  );
  // The origin kept the post-take data.
  await qemuIo(added.nbdUris[0]!, "read -P 0xbb 0 4M");
});

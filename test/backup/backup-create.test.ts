/**
 * `backup create` through the real daemon and CLI (issue 13): `--device` as the issue names it (and `run`
 * as an alias, used by the other backup tests); `--snapshot ID` reads the user's own taken snapshot, leaves
 * it alive, records the CBT numbers of that take (so an incremental after it reads only later changes) and
 * refuses a snapshot that is not taken or does not hold the device.
 */
import assert from "node:assert/strict";
import { copyFile, mkdtemp, rm } from "node:fs/promises";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { after, before, test } from "node:test";
import type { BackupJobView } from "../../src/daemon/backup-jobs.js";
import { DaemonProcess } from "../cli/cli-harness.js";
import { run, runOk, which } from "../helpers/commands.js";
import { backupJson } from "./backup-helpers.js";

const MiB = 1024 * 1024;
let directory = "";
let daemon: DaemonProcess | null = null;

before(async () => {
  directory = await mkdtemp(join(tmpdir(), "blocksnap-backup-create-"));
});
after(async () => {
  await daemon?.stop("SIGKILL");
  await rm(directory, { recursive: true, force: true });
});

async function qemuWrite(device: string, pattern: number, offsetBytes: number, length: string) {
  assert.ok(daemon !== null);
  const uri = `nbd+unix:///${device}?socket=${daemon.nbdSocket}`;
  await runOk("qemu-io", ["-f", "raw", uri, "-c", `write -P ${pattern} ${offsetBytes} ${length}`]);
}

async function sameBytes(a: string, b: string): Promise<void> {
  const cmp = await run("cmp", [a, b]);
  assert.equal(cmp.code, 0, `cmp ${a} ${b}: ${cmp.stdout}${cmp.stderr}`);
}

void test("backup create --snapshot reads the user's snapshot, keeps it, and the next incremental follows it", async (t) => {
  if (!which("qemu-io")) return t.skip("needs qemu-io (qemu-utils)");
  daemon = await DaemonProcess.start(join(directory, "state"));
  const backend = join(directory, "d0.img");
  const other = join(directory, "d1.img");
  await runOk("truncate", ["-s", String(16 * MiB), backend]);
  await runOk("truncate", ["-s", String(4 * MiB), other]);
  await daemon.cliOk(["device", "add", "d0", "--backend", backend]);
  await daemon.cliOk(["device", "add", "d1", "--backend", other]);
  await qemuWrite("d0", 1, 0, "2M");
  const repository = join(directory, "repo");
  await daemon.cliOk(["backup", "init", "--repo", repository, "--chunk-size", "256K"]);
  const backUp = (args: readonly string[]) =>
    backupJson<BackupJobView>(daemon!, ["backup", "create", "--repo", repository, ...args]);

  // A first backup by --device (its own snapshot), so the snapshot's backup below is an incremental.
  const first = await backUp(["--device", "d0"]);
  assert.equal(first.result?.level, "full");

  await qemuWrite("d0", 2, 5 * MiB, "256k");
  const snapshot = (
    await daemon.cliOk(["snapshot", "create", "--storage", "memory:", "--limit", "16M", "--device", "d0"])
  ).trim();
  await daemon.cliOk(["snapshot", "take", snapshot]);
  const atTake = join(directory, "at-take.img");
  await copyFile(backend, atTake);
  // The device moves on after the take: the backup must hold the image, not the device.
  await qemuWrite("d0", 3, 9 * MiB, "256k");
  await qemuWrite("d0", 4, 0, "64k");

  const fromSnapshot = await backUp(["--device", "d0", "--snapshot", snapshot.slice(0, 8)]);
  assert.equal(fromSnapshot.state, "done");
  assert.equal(fromSnapshot.result?.level, "inc", fromSnapshot.levelReason ?? "");
  assert.equal(fromSnapshot.result?.readBytes, 256 * 1024, "only the chunk changed before the take");
  const info = await daemon.cliJson<{ id: string; state: string }>(["snapshot", "info", snapshot]);
  assert.equal(info.state, "taken", "the user's snapshot is still there, taken");
  const restoredSnapshot = join(directory, "restored-snapshot.img");
  await daemon.cliOk([
    "backup",
    "restore",
    `d0/${fromSnapshot.backupId}`,
    "--repo",
    repository,
    "--to",
    restoredSnapshot,
  ]);
  await sameBytes(restoredSnapshot, atTake);

  // Refusals: a snapshot that does not hold the device, one not taken, an unknown one, no device at all.
  const foreign = await daemon.cli([
    "backup",
    "create",
    "--repo",
    repository,
    "--device",
    "d1",
    "--snapshot",
    snapshot,
  ]);
  assert.equal(foreign.code, 1);
  assert.match(foreign.stderr, /does not hold device d1/);
  const untaken = (
    await daemon.cliOk(["snapshot", "create", "--storage", "memory:", "--limit", "8M", "--device", "d1"])
  ).trim();
  const notTaken = await daemon.cli([
    "backup",
    "create",
    "--repo",
    repository,
    "--device",
    "d1",
    "--snapshot",
    untaken,
  ]);
  assert.equal(notTaken.code, 1);
  assert.match(notTaken.stderr, /is not taken/);
  const unknown = await daemon.cli([
    "backup",
    "create",
    "--repo",
    repository,
    "--device",
    "d0",
    "--snapshot",
    "no-such-snapshot",
  ]);
  assert.equal(unknown.code, 1);
  assert.match(unknown.stderr, /no-such-snapshot/);
  const noDevice = await daemon.cli(["backup", "create", "--repo", repository]);
  assert.notEqual(noDevice.code, 0);
  assert.match(noDevice.stderr, /--device/);
  await daemon.cliOk(["snapshot", "destroy", untaken]);

  // After the user's snapshot: the incremental reads only what changed after its take.
  await daemon.cliOk(["snapshot", "destroy", snapshot]);
  const next = await backUp(["--device", "d0", "--level", "inc"]);
  assert.equal(next.result?.level, "inc");
  assert.equal(next.result?.readBytes, 2 * 256 * 1024, "the two chunks written after the take");
  const restoredNext = join(directory, "restored-next.img");
  await daemon.cliOk(["backup", "restore", "d0/latest", "--repo", repository, "--to", restoredNext]);
  await sameBytes(restoredNext, backend);
  const verify = await daemon.cli(["backup", "verify", "--repo", repository]);
  assert.equal(verify.code, 0, verify.stdout + verify.stderr);
});

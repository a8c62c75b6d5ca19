/**
 * `backup restore --device NAME` onto a device held by a taken snapshot, through the real daemon, CLI and
 * nbdcopy (issue 13, "Restore … --device": the writes go through the device, so change tracking and a
 * snapshot see them): the snapshot image keeps the pre-restore bytes (nbdcopy of the image before and after,
 * cmp), the device afterwards equals the backup (cmp with `restore --to FILE`), and CBT marks exactly the
 * restored blocks changed — the device is larger than the backup, so its tail is written by nobody and stays
 * unmarked; the backup's zero chunks (WRITE_ZEROES) are marked too. `--to` an NBD URI is refused in one line
 * that says what to do instead.
 */
import assert from "node:assert/strict";
import { mkdtemp, readFile, rm } from "node:fs/promises";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { after, before, test } from "node:test";
import type { CbtInfoView, SnapshotView } from "../../src/daemon/api-types.js";
import type { BackupJobView } from "../../src/daemon/backup-jobs.js";
import { DaemonProcess } from "../cli/cli-harness.js";
import { run, runOk, which } from "../helpers/commands.js";
import { backupJson, randomFile } from "./backup-helpers.js";

const MiB = 1024 * 1024;
const backupMiB = 16;
const targetMiB = 20;
let directory = "";
let daemon: DaemonProcess | null = null;

before(async () => {
  directory = await mkdtemp(join(tmpdir(), "blocksnap-restore-snapshot-"));
});
after(async () => {
  await daemon?.stop("SIGKILL");
  await rm(directory, { recursive: true, force: true });
});

async function nbdRead(exportName: string, path: string): Promise<void> {
  assert.ok(daemon !== null);
  await runOk("nbdcopy", [`nbd+unix:///${encodeURIComponent(exportName)}?socket=${daemon.nbdSocket}`, path]);
}

async function same(a: string, b: string, extra: readonly string[] = []): Promise<void> {
  const cmp = await run("cmp", [...extra, a, b]);
  assert.equal(cmp.code, 0, `cmp ${a} ${b}: ${cmp.stdout}${cmp.stderr}`);
}

async function createAndTake(device: string): Promise<string> {
  assert.ok(daemon !== null);
  const id = (
    await daemon.cliOk(["snapshot", "create", "--storage", "memory:", "--limit", "64M", "--device", device])
  ).trim();
  await daemon.cliOk(["snapshot", "take", id]);
  return id;
}

void test("restore onto a device in a snapshot: the image keeps the old bytes, CBT marks the restored blocks", async (t) => {
  if (!which("nbdcopy")) return t.skip("needs nbdcopy (libnbd-bin)");
  daemon = await DaemonProcess.start(join(directory, "state"));
  const source = join(directory, "d0.img");
  await randomFile(source, backupMiB, 12); // the last 4 MiB are zero chunks: restored as WRITE_ZEROES
  const target = join(directory, "d1.img");
  await randomFile(target, targetMiB, targetMiB); // old bytes everywhere
  const targetOriginal = join(directory, "d1-original.img");
  await runOk("cp", [target, targetOriginal]);
  await daemon.cliOk(["device", "add", "d0", "--backend", source]);
  await daemon.cliOk(["device", "add", "d1", "--backend", target]);
  const repository = join(directory, "repo");
  await daemon.cliOk(["backup", "init", "--repo", repository, "--chunk-size", "1M"]);
  await backupJson<BackupJobView>(daemon, ["backup", "create", "--device", "d0", "--repo", repository]);
  const backupFile = join(directory, "backup.img");
  await daemon.cliOk(["backup", "restore", "d0/latest", "--repo", repository, "--to", backupFile]);
  await same(backupFile, source);

  // A taken snapshot of d1; its image read before the restore is d1's old bytes.
  const snapshotId = await createAndTake("d1");
  const taken = await daemon.cliJson<CbtInfoView>(["cbt", "info", "d1"]);
  const imageName = `d1@${snapshotId}`;
  const imageBefore = join(directory, "image-before.img");
  await nbdRead(imageName, imageBefore);
  await same(imageBefore, targetOriginal);

  const restored = await backupJson<BackupJobView>(daemon, [
    "backup",
    "restore",
    "d0/latest",
    "--repo",
    repository,
    "--device",
    "d1",
  ]);
  assert.equal(restored.state, "done", JSON.stringify(restored.error));
  assert.equal(restored.restored?.bytesWritten, backupMiB * MiB);

  // The image still shows the old bytes (copy-before-write preserved them); the device holds the backup
  // then its own tail.
  const imageAfter = join(directory, "image-after.img");
  await nbdRead(imageName, imageAfter);
  await same(imageAfter, imageBefore);
  const deviceAfter = join(directory, "d1-after.img");
  await nbdRead("d1", deviceAfter);
  await same(deviceAfter, backupFile, ["-n", String(backupMiB * MiB)]);
  await same(deviceAfter, targetOriginal, ["-i", String(backupMiB * MiB)]);
  const info = await daemon.cliJson<SnapshotView>(["snapshot", "info", snapshotId]);
  const stored = info.devices.find((device) => device.name === "d1")?.chunksStored ?? 0;
  assert.ok(stored > 0, `copy-before-write preserved chunks of d1: ${JSON.stringify(info)}`);

  // CBT: the next take's map marks every block the restore wrote (changes number of that take), and no
  // block of the tail nobody wrote.
  await daemon.cliOk(["snapshot", "destroy", snapshotId]);
  const nextId = await createAndTake("d1");
  const next = await daemon.cliJson<CbtInfoView>(["cbt", "info", "d1"]);
  assert.equal(next.generationId, taken.generationId, "same CBT generation");
  assert.equal(next.changesNumber, taken.changesNumber + 1);
  const mapPath = join(directory, "d1.cbt");
  await daemon.cliOk(["cbt", "read", "d1", "--out", mapPath]);
  const map = new Uint8Array(await readFile(mapPath));
  const restoredBlocks = Math.ceil((backupMiB * MiB) / next.blockSizeBytes);
  assert.equal(map.length, next.blockCount);
  for (let blockIndex = 0; blockIndex < map.length; blockIndex++) {
    const value = map[blockIndex] ?? 0;
    if (blockIndex < restoredBlocks)
      assert.ok(value > taken.changesNumber, `block ${blockIndex} restored: changed (${value})`);
    else assert.ok(value <= taken.changesNumber, `block ${blockIndex} of the tail: unchanged (${value})`);
  }
  await daemon.cliOk(["snapshot", "destroy", nextId]);

  // An NBD URI as --to: refused in one line that says what to do instead.
  for (const uri of [`nbd+unix:///d1?socket=${daemon.nbdSocket}`, "nbd://localhost/d1"]) {
    const refused = await daemon.cli(["backup", "restore", "d0/latest", "--repo", repository, "--to", uri]);
    assert.equal(refused.code, 1);
    const lines = refused.stderr.split("\n").filter((line) => line.trim() !== "");
    assert.equal(lines.length, 1, refused.stderr);
    assert.match(lines[0] ?? "", /--to FILE, then nbdcopy FILE/);
    assert.ok(lines[0]?.includes(uri), lines[0]);
    assert.match(lines[0] ?? "", /--device NAME/);
    assert.match(lines[0] ?? "", /\(ENOTSUP\)$/);
  }
});

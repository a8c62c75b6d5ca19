/**
 * Dedup across devices (issue 13, "two devices with the same content store it once"): two devices whose
 * backends hold the same random bytes (no repeated patterns, so every chunk is distinct) are backed up
 * through the real daemon into one repository. The second backup stores no new chunk; the chunk files on
 * disk (their count and bytes) do not change; both backups restore byte for byte. `backup forget` then
 * deletes one backup: its shared chunks survive a prune; after forgetting the other, prune removes them all.
 */
import assert from "node:assert/strict";
import { copyFile, mkdtemp, rm } from "node:fs/promises";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { after, before, test } from "node:test";
import type { BackupJobView } from "../../src/daemon/backup-jobs.js";
import { DaemonProcess } from "../cli/cli-harness.js";
import { run, runOk } from "../helpers/commands.js";
import { backupJson, chunkFilesOf } from "./backup-helpers.js";

const MiB = 1024 * 1024;
let directory = "";
let daemon: DaemonProcess | null = null;

before(async () => {
  directory = await mkdtemp(join(tmpdir(), "blocksnap-dedup-"));
});
after(async () => {
  await daemon?.stop("SIGKILL");
  await rm(directory, { recursive: true, force: true });
});

async function backUp(device: string, repository: string): Promise<BackupJobView> {
  assert.ok(daemon !== null);
  return await backupJson<BackupJobView>(daemon, ["backup", "run", device, "--repo", repository]);
}

void test("two devices with the same content: the second backup stores no chunk", async () => {
  daemon = await DaemonProcess.start(join(directory, "state"));
  const first = join(directory, "first.img");
  const second = join(directory, "second.img");
  // 6 MiB of random data then 2 MiB of holes (zero chunks, stored as nothing).
  await runOk("truncate", ["-s", String(8 * MiB), first]);
  await runOk("dd", ["if=/dev/urandom", `of=${first}`, "bs=1M", "count=6", "conv=notrunc", "status=none"]);
  await copyFile(first, second);
  await daemon.cliOk(["device", "add", "first", "--backend", first]);
  await daemon.cliOk(["device", "add", "second", "--backend", second]);
  const repository = join(directory, "repo");
  await daemon.cliOk(["backup", "init", "--repo", repository, "--chunk-size", "256K"]);

  const one = await backUp("first", repository);
  assert.equal(one.state, "done");
  const chunksAfterOne = await chunkFilesOf(repository);
  assert.equal(one.result?.newChunks, (6 * MiB) / (256 * 1024), "every random chunk is new");
  assert.equal(chunksAfterOne.count, one.result?.newChunks);
  assert.equal(chunksAfterOne.bytes, one.result?.newBytesStored);

  const two = await backUp("second", repository);
  assert.equal(two.state, "done");
  assert.equal(two.result?.level, "full");
  assert.equal(two.result?.readBytes, 8 * MiB, "the second device was read whole");
  assert.equal(two.result?.newChunks, 0);
  assert.equal(two.result?.newBytesStored, 0);
  assert.deepEqual(await chunkFilesOf(repository), chunksAfterOne, "no chunk file added or changed");

  const listed = await daemon.cliJson<{ backups: { device: string; newBytesStored: number }[] }>([
    "backup",
    "list",
    "--repo",
    repository,
  ]);
  assert.deepEqual(
    listed.backups.map((backup) => [backup.device, backup.newBytesStored]),
    [
      ["first", chunksAfterOne.bytes],
      ["second", 0],
    ],
  );
  for (const [device, original] of [
    ["first", first],
    ["second", second],
  ] as const) {
    const restored = join(directory, `${device}-restored.img`);
    await daemon.cliOk(["backup", "restore", `${device}/latest`, "--repo", repository, "--to", restored]);
    const cmp = await run("cmp", [restored, original]);
    assert.equal(cmp.code, 0, cmp.stdout + cmp.stderr);
  }

  // forget: one backup's manifest goes; the chunks the other still names stay through a prune, and go
  // when no backup names them any more.
  const prune = ["backup", "prune", "--repo", repository, "--keep-last", "1", "--grace-hours", "0"];
  const forgotten = await daemon.cliJson<{ forgotten: string }>([
    "backup",
    "forget",
    "second/latest",
    "--repo",
    repository,
  ]);
  assert.equal(forgotten.forgotten, `second/${two.backupId}`);
  const unknown = await daemon.cli(["backup", "forget", `second/${two.backupId}`, "--repo", repository]);
  assert.equal(unknown.code, 1);
  assert.equal(unknown.stderr.trim().split("\n").length, 1, unknown.stderr);
  assert.match(unknown.stderr, new RegExp(`No backup second/${two.backupId} in `));
  const keptAll = await daemon.cliJson<{ removedChunks: number }>(prune);
  assert.equal(keptAll.removedChunks, 0, "the first backup still names every chunk");
  assert.deepEqual(await chunkFilesOf(repository), chunksAfterOne);
  await daemon.cliOk(["backup", "forget", `first/${one.backupId}`, "--repo", repository]);
  const listedAfter = await daemon.cliJson<{ backups: unknown[] }>(["backup", "list", "--repo", repository]);
  assert.deepEqual(listedAfter.backups, []);
  const removedAll = await daemon.cliJson<{ removedChunks: number }>(prune);
  assert.equal(removedAll.removedChunks, chunksAfterOne.count);
  assert.equal((await chunkFilesOf(repository)).count, 0);
});

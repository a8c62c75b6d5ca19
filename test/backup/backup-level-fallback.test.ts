/**
 * The level rule of issue 13 when the CBT chain is broken, through the daemon and CLI: after the device is
 * removed and added again (a new CBT generation), `--level inc` fails with one clear line naming the
 * generation change and stores nothing, and `--level auto` falls back to a full backup with that reason.
 * The restore of that backup to a new file is sparse: its zero chunks are holes.
 */
import assert from "node:assert/strict";
import { mkdtemp, rm, stat } from "node:fs/promises";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { after, before, test } from "node:test";
import type { BackupJobView } from "../../src/daemon/backup-jobs.js";
import { DaemonProcess } from "../cli/cli-harness.js";
import { run, runOk } from "../helpers/commands.js";
import { backupJson, chunkFilesOf } from "./backup-helpers.js";

let directory = "";
let daemon: DaemonProcess | null = null;

before(async () => {
  directory = await mkdtemp(join(tmpdir(), "blocksnap-level-fallback-"));
});
after(async () => {
  await daemon?.stop("SIGKILL");
  await rm(directory, { recursive: true, force: true });
});

void test("a new CBT generation: --level inc fails in one line, --level auto falls back to full with the reason", async () => {
  daemon = await DaemonProcess.start(join(directory, "state"));
  const backend = join(directory, "d0.img");
  await runOk("truncate", ["-s", String(8 << 20), backend]);
  await runOk("dd", ["if=/dev/urandom", `of=${backend}`, "bs=1M", "count=2", "conv=notrunc", "status=none"]);
  await daemon.cliOk(["device", "add", "d0", "--backend", backend]);
  const repository = join(directory, "repo");
  await daemon.cliOk(["backup", "init", "--repo", repository, "--chunk-size", "256K"]);
  const create = (level: string) => [
    "backup",
    "create",
    "--device",
    "d0",
    "--repo",
    repository,
    "--level",
    level,
  ];
  const first = await backupJson<BackupJobView>(daemon, create("full"));
  assert.equal(first.result?.level, "full");

  await daemon.cliOk(["device", "remove", "d0"]);
  await daemon.cliOk(["device", "add", "d0", "--backend", backend]);
  const stored = await chunkFilesOf(repository);
  const refused = await daemon.cli(create("inc"));
  assert.equal(refused.code, 1, refused.stdout + refused.stderr);
  const lines = refused.stderr.trim().split("\n");
  assert.equal(lines.length, 1, `one line: ${refused.stderr}`);
  assert.match(lines[0] ?? "", /Cannot back up incrementally: CBT generation changed since backup/);
  assert.deepEqual(await chunkFilesOf(repository), stored, "the refused incremental stored nothing");

  const fallback = await backupJson<BackupJobView>(daemon, create("auto"));
  assert.equal(fallback.result?.level, "full");
  assert.match(fallback.levelReason ?? "", /^full backup: CBT generation changed since backup/);
  const listed = await daemon.cliJson<{ backups: { level: string }[] }>([
    "backup",
    "list",
    "--repo",
    repository,
  ]);
  assert.deepEqual(
    listed.backups.map((backup) => backup.level),
    ["full", "full"],
  );

  // 2 MiB of data and 6 MiB of zero chunks: the restored file holds the bytes and allocates the data only.
  const restored = join(directory, "restored.img");
  await daemon.cliOk(["backup", "restore", "d0/latest", "--repo", repository, "--to", restored]);
  const cmp = await run("cmp", [restored, backend]);
  assert.equal(cmp.code, 0, cmp.stdout + cmp.stderr);
  const allocatedBytes = (await stat(restored)).blocks * 512;
  assert.ok(allocatedBytes <= 3 << 20, `zero chunks are holes: ${allocatedBytes} bytes allocated of 8 MiB`);
});

/**
 * `backup restore BACKUP --device NAME` through the real daemon and CLI (issue 13, "Restore … --device"):
 * the backup is written onto a blocksnap device's origin and read back over NBD with nbdcopy, then compared
 * with `cmp` against the backed-up device. Zero chunks overwrite old data; a larger device keeps its tail; a
 * smaller one is refused, and so is a device with an NBD client on it unless --force.
 */
import assert from "node:assert/strict";
import { spawn } from "node:child_process";
import { mkdtemp, rm } from "node:fs/promises";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { after, before, test } from "node:test";
import type { BackupJobView } from "../../src/daemon/backup-jobs.js";
import { DaemonProcess } from "../cli/cli-harness.js";
import { missingTools, run, runOk } from "../helpers/commands.js";
import { backupJson, randomFile } from "./backup-helpers.js";

const MiB = 1024 * 1024;
let directory = "";
let daemon: DaemonProcess | null = null;

before(async () => {
  directory = await mkdtemp(join(tmpdir(), "blocksnap-restore-device-"));
});
after(async () => {
  await daemon?.stop("SIGKILL");
  await rm(directory, { recursive: true, force: true });
});

/** An NBD client holding the export open until released (nbdsh waits on its stdin). */
async function holdExport(uri: string): Promise<() => Promise<void>> {
  const child = spawn(
    "nbdsh",
    ["-u", uri, "-c", "import sys\nprint('connected', flush=True)\nsys.stdin.read()"],
    {
      stdio: ["pipe", "pipe", "pipe"],
      // nbdsh runs `python3` from PATH: the system one has libnbd's module, a pyenv one may not.
      env: { ...process.env, PATH: `/usr/bin:/bin:${process.env.PATH ?? ""}` },
    },
  );
  let stderr = "";
  child.stderr.setEncoding("utf8").on("data", (text: string) => {
    stderr += text;
  });
  const exited = new Promise((resolve) => child.once("close", resolve));
  await new Promise<void>((resolve, reject) => {
    const timer = setTimeout(() => reject(new Error(`nbdsh did not connect: ${stderr}`)), 60_000);
    child.stdout.setEncoding("utf8").on("data", (text: string) => {
      if (text.includes("connected")) {
        clearTimeout(timer);
        resolve();
      }
    });
    child.once("error", reject);
    child.once("close", () => reject(new Error(`nbdsh exited: ${stderr}`)));
  });
  return async () => {
    child.stdin.end();
    await exited;
  };
}

async function readDevice(name: string, path: string): Promise<void> {
  assert.ok(daemon !== null);
  await runOk("nbdcopy", [`nbd+unix:///${name}?socket=${daemon.nbdSocket}`, path]);
}

async function same(a: string, b: string, extra: readonly string[] = []): Promise<void> {
  const cmp = await run("cmp", [...extra, a, b]);
  assert.equal(cmp.code, 0, `cmp ${a} ${b}: ${cmp.stdout}${cmp.stderr}`);
}

void test("restore onto a blocksnap device: nbdcopy reads back the backed-up bytes", async (t) => {
  const missing = missingTools("nbdcopy", "nbdsh");
  if (missing) return t.skip(missing);
  daemon = await DaemonProcess.start(join(directory, "state"));
  const source = join(directory, "d0.img");
  await randomFile(source, 16, 10); // the last 6 MiB are zero chunks
  const target = join(directory, "d1.img");
  await randomFile(target, 16, 16); // old data everywhere, zero chunks included
  const larger = join(directory, "d2.img");
  await randomFile(larger, 20, 20);
  const largerBefore = join(directory, "d2-before.img");
  await runOk("cp", [larger, largerBefore]);
  const smaller = join(directory, "d3.img");
  await randomFile(smaller, 8, 8);
  for (const [name, path] of [
    ["d0", source],
    ["d1", target],
    ["d2", larger],
    ["d3", smaller],
  ] as const)
    await daemon.cliOk(["device", "add", name, "--backend", path]);
  const repository = join(directory, "repo");
  await daemon.cliOk(["backup", "init", "--repo", repository, "--chunk-size", "1M"]);
  const backup = await backupJson<BackupJobView>(daemon, [
    "backup",
    "create",
    "--device",
    "d0",
    "--repo",
    repository,
  ]);
  const restoreArgs = (device: string) => [
    "backup",
    "restore",
    "d0/latest",
    "--repo",
    repository,
    "--device",
    device,
  ];

  // An NBD client on d1: refused, then written with --force.
  const release = await holdExport(`nbd+unix:///d1?socket=${daemon.nbdSocket}`);
  try {
    const refused = await daemon.cli(restoreArgs("d1"));
    assert.equal(refused.code, 1);
    assert.match(refused.stderr, /Device d1 is in use \(1 NBD client\(s\) on export d1\).*--force/);
    const forced = await backupJson<BackupJobView>(daemon, [...restoreArgs("d1"), "--force"]);
    assert.equal(forced.kind, "restore");
    assert.equal(forced.state, "done");
    assert.equal(forced.backupId, backup.backupId);
    assert.deepEqual(forced.restored, { bytesWritten: 16 * MiB, chunksRead: 10 });
  } finally {
    await release();
  }
  const readBack = join(directory, "d1-read.img");
  await readDevice("d1", readBack);
  await same(readBack, source);

  // A larger device: the backup's bytes, then its own tail.
  const human = await daemon.cliOk(restoreArgs("d2"));
  assert.match(human, new RegExp(`restored ${backup.backupId} onto device d2: 16`));
  const largerRead = join(directory, "d2-read.img");
  await readDevice("d2", largerRead);
  await same(largerRead, source, ["-n", String(16 * MiB)]);
  await same(largerRead, largerBefore, ["-i", String(16 * MiB)]);

  // A smaller device, an unknown backup, an unknown device: one clear line each, nothing written.
  const tooSmall = await daemon.cli(restoreArgs("d3"));
  assert.equal(tooSmall.code, 1);
  assert.match(tooSmall.stderr, /Device d3 \(8388608 bytes\) is smaller than backup d0\//);
  const unknown = await daemon.cli(["backup", "restore", "d0/nope", "--repo", repository, "--device", "d1"]);
  assert.equal(unknown.code, 1);
  assert.match(unknown.stderr, /No backup d0\/nope/);
  const noDevice = await daemon.cli(restoreArgs("nope"));
  assert.equal(noDevice.code, 1);
  const neither = await daemon.cli(["backup", "restore", "d0/latest", "--repo", repository]);
  assert.equal(neither.code, 2);
  assert.match(neither.stderr, /--to PATH or --device NAME/);
});

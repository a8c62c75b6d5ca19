/**
 * Instant restore: `blocksnap backup mount` serves a backup read-only over NBD from the CLI process, and
 * clients nobody on this project wrote read it — nbdinfo (size, read-only), nbdcopy and qemu-img compare
 * against the device as it was at the backup; qemu-io's write is refused; SIGTERM ends it, exit 0, socket
 * removed. The repository uses small chunks so reads cross many of them.
 */
import assert from "node:assert/strict";
import { type ChildProcess, spawn } from "node:child_process";
import { existsSync } from "node:fs";
import { mkdtemp, rm } from "node:fs/promises";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { after, test } from "node:test";
import type { BackupJobView } from "../../src/daemon/backup-jobs.js";
import { cleanEnvironment, cliPath, DaemonProcess } from "../cli/cli-harness.js";
import { missingTools, run, runOk } from "../helpers/commands.js";
import { backupJson } from "./backup-helpers.js";

const MiB = 1024 * 1024;
const cleanups: Array<() => Promise<unknown>> = [];

after(async () => {
  for (const cleanup of cleanups.reverse()) await cleanup().catch(() => {});
});

void test("backup mount serves a backup read-only over NBD: nbdinfo, nbdcopy and qemu-img read it as it was", async (t) => {
  const missing = missingTools("qemu-io", "qemu-img", "nbdcopy", "nbdinfo", "cmp");
  if (missing) return t.skip(missing);
  const directory = await mkdtemp(join(tmpdir(), "blocksnap-backup-mount-"));
  cleanups.push(() => rm(directory, { recursive: true, force: true }));
  const daemon = await DaemonProcess.start(join(directory, "state"));
  cleanups.push(() => daemon.stop("SIGKILL"));
  const backend = join(directory, "d0.img");
  await runOk("truncate", ["-s", String(24 * MiB), backend]);
  await daemon.cliOk(["device", "add", "d0", "--backend", backend]);
  const uri = `nbd+unix:///d0?socket=${daemon.nbdSocket}`;
  await runOk("qemu-io", [
    "-f",
    "raw",
    uri,
    "-c",
    "write -P 7 0 3M",
    "-c",
    "write -P 9 10M 1M",
    "-c",
    "write -P 5 23M 4k",
  ]);
  const repository = join(directory, "repo");
  await daemon.cliOk(["backup", "init", "--repo", repository, "--chunk-size", "64K"]);
  const job = await backupJson<BackupJobView>(daemon, ["backup", "run", "d0", "--repo", repository]);
  assert.equal(job.state, "done");
  const atBackup = join(directory, "at-backup.img");
  await runOk("nbdcopy", [uri, atBackup]);
  // The device moves on; the mount must show the backup, not the device.
  await runOk("qemu-io", ["-f", "raw", uri, "-c", "write -P 1 0 24M"]);

  const socket = join(directory, "mount.sock");
  const mount: ChildProcess = spawn(
    process.execPath,
    [cliPath, "backup", "mount", "d0/latest", "--repo", repository, "--nbd-socket", socket],
    { env: cleanEnvironment(), stdio: ["ignore", "pipe", "pipe"] },
  );
  cleanups.push(async () => mount.kill("SIGKILL"));
  let output = "";
  mount.stdout?.setEncoding("utf8").on("data", (text: string) => {
    output += text;
  });
  mount.stderr?.setEncoding("utf8").on("data", (text: string) => {
    output += text;
  });
  const exited = new Promise<number | null>((resolve) => mount.once("exit", (code) => resolve(code)));
  for (let attempt = 0; attempt < 300 && !output.includes("serving"); attempt++) {
    await new Promise((resolve) => setTimeout(resolve, 50));
  }
  assert.match(output, /serving d0\/\S+ read-only at nbd\+unix:\/\/\/d0\?socket=/);
  const mounted = `nbd+unix:///d0?socket=${socket}`;

  const info = await runOk("nbdinfo", ["--json", mounted]);
  const exportInfo = (JSON.parse(info) as { exports: { "export-size": number; is_read_only: boolean }[] })
    .exports[0];
  assert.equal(exportInfo?.["export-size"], 24 * MiB);
  assert.equal(exportInfo?.is_read_only, true);
  const copy = join(directory, "mounted-copy.img");
  await runOk("nbdcopy", [mounted, copy]);
  const cmp = await run("cmp", [atBackup, copy]);
  assert.equal(cmp.code, 0, `the mounted backup differs from the device at backup: ${cmp.stdout}`);
  const compare = await run("qemu-img", ["compare", "-f", "raw", "-F", "raw", atBackup, mounted]);
  assert.equal(compare.code, 0, compare.stdout + compare.stderr);
  const write = await run("qemu-io", ["-f", "raw", mounted, "-c", "write -P 3 0 4k"]);
  assert.notEqual(write.code, 0, "a write to a mounted backup is refused");

  mount.kill("SIGTERM");
  assert.equal(await exited, 0, output);
  assert.equal(existsSync(socket), false, "the socket is removed at stop");
});

/**
 * A kept snapshot of a mounted ext4, through a kill -9 of the daemon, with the real kernel: ext4 on a loop
 * device over d0's FUSE file; files written, a snapshot taken (the take freezes the file system), more
 * files written and synced; the daemon is killed with SIGKILL. After the restart the file system is mounted
 * again (its journal replays), holds every synced file and `e2fsck -fn` finds it clean; the snapshot is
 * still taken and its image, mounted read-only, holds exactly the files from before the take.
 *
 * Root only (FUSE, losetup, mount); skipped with the reason otherwise. Every mount and loop device is
 * undone in `after`, also when an assertion fails.
 */
import assert from "node:assert/strict";
import { createHash, randomBytes } from "node:crypto";
import { mkdir, mkdtemp, readdir, readFile, rm, writeFile } from "node:fs/promises";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { after, test } from "node:test";
import type { DeviceListView, DeviceView, SnapshotView } from "../../src/daemon/api-types.js";
import { DaemonProcess } from "../cli/cli-harness.js";
import { isRoot, missingTools, run, runOk } from "../helpers/commands.js";
import { attachLoop, detachLoop, detachLoopOk } from "../helpers/loop-device.js";

const cleanups: Array<() => Promise<unknown>> = [];

after(async () => {
  for (const cleanup of cleanups.reverse()) await cleanup().catch(() => {});
});

async function attachUntilCleanup(file: string, readOnly: boolean): Promise<string> {
  const loop = await attachLoop(file, readOnly ? ["-r"] : []);
  cleanups.push(() => detachLoop(loop));
  return loop;
}

async function digests(directory: string): Promise<Map<string, string>> {
  const result = new Map<string, string>();
  for (const name of (await readdir(directory)).filter((entry) => entry.startsWith("file-"))) {
    result.set(
      name,
      createHash("sha256")
        .update(await readFile(join(directory, name)))
        .digest("hex"),
    );
  }
  return result;
}

void test("a snapshot of a mounted ext4 survives kill -9: the file system remounts clean, the image holds the files at take", async (t) => {
  if (!isRoot) return t.skip("needs root (FUSE, losetup, mount)");
  const missing = missingTools("losetup", "mkfs.ext4", "mount", "umount", "e2fsck");
  if (missing) return t.skip(missing);
  const directory = await mkdtemp(join(tmpdir(), "blocksnap-snap-mounted-kill-"));
  cleanups.push(() => rm(directory, { recursive: true, force: true }));
  const stateDir = join(directory, "state");
  const storageDir = join(directory, "storage");
  const mountPoint = join(directory, "mnt");
  const imageMount = join(directory, "image");
  await Promise.all([mkdir(storageDir), mkdir(mountPoint), mkdir(imageMount)]);
  const startDaemon = () => DaemonProcess.start(stateDir, { args: ["--nbd-listen", "none"] });
  // Pushed first, so it runs last: a daemon stopped with SIGKILL leaves its FUSE mount behind.
  cleanups.push(() => run("umount", ["-l", join(stateDir, "mnt")]));
  let daemon = await startDaemon();
  cleanups.push(() => daemon.stop("SIGKILL"));

  const device = await daemon.cliJson<DeviceView>([
    "device",
    "add",
    "d0",
    "--backend",
    join(directory, "d0.img"),
    "--size",
    "64M",
  ]);
  assert.ok(device.fusePath, "FUSE serves d0");
  const loop = await attachUntilCleanup(device.fusePath, false);
  await runOk("mkfs.ext4", ["-q", "-F", loop], 60_000);
  await runOk("mount", [loop, mountPoint]);
  cleanups.push(() => run("umount", ["-l", mountPoint]));
  for (let index = 0; index < 8; index++)
    await writeFile(join(mountPoint, `file-a${index}`), randomBytes(300_000));
  await runOk("sync", []);
  const atTake = await digests(mountPoint);

  const id = (
    await daemon.cliOk(["snapshot", "create", "--storage", storageDir, "--limit", "64M", "--device", "d0"])
  ).trim();
  await daemon.cliOk(["snapshot", "take", id]);
  for (let index = 0; index < 4; index++)
    await writeFile(join(mountPoint, `file-a${index}`), randomBytes(200_000));
  for (let index = 0; index < 4; index++)
    await writeFile(join(mountPoint, `file-b${index}`), randomBytes(200_000));
  await runOk("sync", []);
  const synced = await digests(mountPoint);

  daemon.child.kill("SIGKILL");
  await daemon.exited;
  await run("umount", ["-l", mountPoint]);
  await detachLoop(loop);

  daemon = await startDaemon();
  const info = await daemon.cliJson<SnapshotView>(["snapshot", "info", id]);
  assert.equal(info.state, "taken");
  const list = await daemon.cliJson<DeviceListView>(["device", "list"]);
  const origin = list.devices.find((entry) => entry.name === "d0");
  assert.ok(origin?.fusePath, "d0 is served on FUSE again");
  const loopAgain = await attachUntilCleanup(origin.fusePath, false);
  await runOk("mount", [loopAgain, mountPoint]);
  assert.deepEqual(await digests(mountPoint), synced, "every synced file is back");
  await runOk("umount", [mountPoint]);
  const fsck = await run("e2fsck", ["-fn", loopAgain]);
  assert.equal(fsck.code, 0, `e2fsck -fn after the restart: ${fsck.stdout}${fsck.stderr}`);

  const imagePath = info.devices[0]?.fusePath;
  assert.ok(imagePath, "the image is served on FUSE again");
  const imageLoop = await attachUntilCleanup(imagePath, true);
  await runOk("mount", ["-o", "ro,noload", imageLoop, imageMount]);
  cleanups.push(() => run("umount", ["-l", imageMount]));
  assert.deepEqual(await digests(imageMount), atTake, "the image holds exactly the files at take");
  await runOk("umount", [imageMount]);
  // An image still open through a loop device is not destroyed (EBUSY): detach it first.
  await detachLoopOk(imageLoop);
  await daemon.cliOk(["snapshot", "destroy", id]);
});

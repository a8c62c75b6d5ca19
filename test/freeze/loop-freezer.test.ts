/**
 * LoopFreezer on a real loop device (root): discovery by backing file, freeze of the mounted file system
 * for the duration of the session, thaw always, hooks with their environment, failures reported.
 * The full path through blocksnap's FUSE files is covered by the FUSE and daemon tests.
 */
import assert from "node:assert/strict";
import { mkdirSync, mkdtempSync, readFileSync, rmSync, writeFileSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { after, before, test } from "node:test";
import { LoopFreezer } from "../../src/freeze/loop-freezer.js";
import { findLoopMounts } from "../../src/freeze/mount-discovery.js";
import { isRoot, run, runOk, which } from "../helpers/commands.js";
import { attachLoop, detachLoop } from "../helpers/loop-device.js";

const directory = mkdtempSync(join(tmpdir(), "blocksnap-freeze-"));
const backing = join(directory, "fs.img");
const mountPoint = join(directory, "mnt");
let loopDevice = "";
const skipReason = !isRoot
  ? "needs root for losetup and mount"
  : !which("mkfs.ext4") || !which("fsfreeze")
    ? "mkfs.ext4 or fsfreeze is not installed"
    : null;

before(async () => {
  if (skipReason) return;
  writeFileSync(backing, new Uint8Array(32 << 20));
  loopDevice = await attachLoop(backing);
  await runOk("mkfs.ext4", ["-q", loopDevice]);
  mkdirSync(mountPoint);
  await runOk("mount", [loopDevice, mountPoint]);
});

after(async () => {
  if (loopDevice) {
    await run("fsfreeze", ["--unfreeze", mountPoint]);
    await run("umount", [mountPoint]);
    await detachLoop(loopDevice);
  }
  rmSync(directory, { recursive: true, force: true });
});

test("LoopFreezer freezes the file system on a device's loop for the session and always thaws", async (t) => {
  if (skipReason) return t.skip(skipReason);
  const mounts = findLoopMounts([backing]);
  assert.deepEqual(
    mounts.map((mount) => [mount.loopDevice, mount.mountPoint, mount.fsType]),
    [[loopDevice, mountPoint, "ext4"]],
  );
  const hookLog = join(directory, "hooks.log");
  const freezer = new LoopFreezer({ deviceFilePath: (name) => (name === "disk0" ? backing : null) });
  const session = await freezer.freeze({
    snapshotId: "11111111-2222-3333-4444-555555555555",
    deviceNames: ["disk0", "other"],
    preTakeCommand: `echo "pre $BLOCKSNAP_SNAPSHOT_ID $BLOCKSNAP_DEVICES" >> ${hookLog}`,
    postTakeCommand: `echo "post $BLOCKSNAP_TAKE_RESULT" >> ${hookLog}`,
    timeoutMs: 10_000,
  });
  // While frozen, a second freeze is refused by the kernel (EBUSY).
  const second = await run("fsfreeze", ["--freeze", mountPoint]);
  assert.notEqual(second.code, 0, "the file system is frozen during the session");
  const report = await session.thaw(new Error("take failed on purpose"));
  assert.equal(report.frozen.length, 1);
  assert.equal(report.frozen[0]?.device, "disk0");
  assert.equal(report.frozen[0]?.error, null);
  assert.equal(report.preTake?.exitCode, 0);
  assert.equal(report.postTake?.exitCode, 0);
  // Thawed: freezing works again.
  await runOk("fsfreeze", ["--freeze", mountPoint]);
  await runOk("fsfreeze", ["--unfreeze", mountPoint]);
  assert.equal(
    readFileSync(hookLog, "utf8"),
    "pre 11111111-2222-3333-4444-555555555555 disk0 other\npost failed\n",
  );
});

test("a failing or hanging hook is reported and leaves nothing frozen", async (t) => {
  if (skipReason) return t.skip(skipReason);
  const freezer = new LoopFreezer({ deviceFilePath: () => backing });
  const session = await freezer.freeze({
    snapshotId: "11111111-2222-3333-4444-555555555555",
    deviceNames: ["disk0"],
    preTakeCommand: "exit 3",
    postTakeCommand: "sleep 30",
    timeoutMs: 500,
  });
  const report = await session.thaw(null);
  assert.equal(report.preTake?.exitCode, 3);
  assert.equal(report.postTake?.timedOut, true);
  await runOk("fsfreeze", ["--freeze", mountPoint]);
  await runOk("fsfreeze", ["--unfreeze", mountPoint]);
});

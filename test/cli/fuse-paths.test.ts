/**
 * The daemon's own FUSE mount against hostile paths and crashes (issue 11 items 3, 4, 12, 13), through the
 * real daemon, CLI, losetup, mkfs and mount:
 * - a backend or storage on our FUSE mount (directly, through a bind mount, through a loop device over a
 *   FUSE file) is refused and the daemon keeps answering: it would deadlock on its own I/O;
 * - after kill -9 the dead mount is cleaned up by the next `serve --fuse-mount DIR`;
 * - `device remove` under an ext4 mounted on a loop device over its FUSE file is EBUSY unless --force;
 * - a `device remove` whose final flush fails leaves the device listed, saved and serving.
 * Root only (FUSE, losetup, mount); skipped with the reason otherwise. Every mount, loop device and
 * process is undone in `after`, also when a test fails.
 */
import assert from "node:assert/strict";
import { mkdir, mkdtemp, readFile, rm, stat, writeFile } from "node:fs/promises";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { after, before, type TestContext, test } from "node:test";
import type { DeviceView, StatusView } from "../../src/daemon/api-types.js";
import { isRoot, missingTools, run, runOk } from "../helpers/commands.js";
import { attachLoop, detachLoop } from "../helpers/loop-device.js";
import { DaemonProcess } from "./cli-harness.js";

const MiB = 1024 * 1024;
let directory = "";
const daemons: DaemonProcess[] = [];
/** Undone in reverse order in `after`: umount, losetup -d. */
const cleanups: (() => Promise<unknown>)[] = [];

before(async () => {
  directory = await mkdtemp(join(tmpdir(), "blocksnap-fuse-paths-"));
});

after(async () => {
  for (const cleanup of cleanups.reverse()) await cleanup().catch(() => {});
  for (const daemon of daemons) await daemon.stop("SIGKILL");
  // A daemon killed above leaves its mount dead: lazily unmount what is left under our directory.
  const mounts = await readFile("/proc/self/mounts", "utf8");
  for (const line of mounts.split("\n").reverse()) {
    const mountPoint = line.split(" ")[1];
    if (mountPoint?.startsWith(`${directory}/`)) await run("umount", ["-l", mountPoint]);
  }
  await rm(directory, { recursive: true, force: true });
});

function skipReason(): string | undefined {
  if (!isRoot) return "needs root (FUSE, losetup, mount)";
  return missingTools("losetup", "mkfs.ext4", "mount", "umount");
}

async function startWithFuse(name: string, mountDir: string): Promise<DaemonProcess> {
  const daemon = await DaemonProcess.start(join(directory, name), {
    args: ["--nbd-listen", "none", "--fuse-mount", mountDir],
  });
  daemons.push(daemon);
  return daemon;
}

async function attachUntilCleanup(file: string): Promise<string> {
  const loop = await attachLoop(file);
  cleanups.push(() => detachLoop(loop));
  return loop;
}

async function mountExt4(loop: string, mountPoint: string): Promise<void> {
  await mkdir(mountPoint, { recursive: true });
  await runOk("mkfs.ext4", ["-q", "-F", loop], 60_000);
  await runOk("mount", [loop, mountPoint]);
  cleanups.push(() => run("umount", ["-l", mountPoint]));
}

async function refused(daemon: DaemonProcess, args: readonly string[], message: RegExp): Promise<void> {
  const result = await daemon.cli(args);
  assert.equal(result.code, 1, `blocksnap ${args.join(" ")} should fail: ${result.stdout}`);
  assert.match(result.stderr, message, `blocksnap ${args.join(" ")}`);
  // The daemon is not stuck on its own I/O.
  await daemon.cliJson<StatusView>(["status"]);
}

async function registryNames(daemon: DaemonProcess): Promise<string[]> {
  const registry = JSON.parse(await readFile(join(daemon.stateDir, "devices.json"), "utf8")) as {
    devices: { name: string }[];
  };
  return registry.devices.map((device) => device.name);
}

async function listedNames(daemon: DaemonProcess): Promise<string[]> {
  return (await daemon.cliJson<StatusView>(["status"])).devices.map((device) => device.name);
}

void test("a backend or storage on our own FUSE mount is refused, also by bind mount and loop device", async (t: TestContext) => {
  const reason = skipReason();
  if (reason) return t.skip(reason);
  const mountDir = join(directory, "fuse-a");
  const daemon = await startWithFuse("state-a", mountDir);
  const device = await daemon.cliJson<DeviceView>([
    "device",
    "add",
    "d0",
    "--backend",
    "memory:",
    "--size",
    "8M",
  ]);
  assert.equal(device.fusePath, join(mountDir, "d0"));
  const fuseFile = join(mountDir, "d0");
  await refused(daemon, ["device", "add", "dup", "--backend", fuseFile], /own FUSE mount/);
  await refused(
    daemon,
    ["device", "add", "new", "--backend", join(mountDir, "new"), "--size", "1M"],
    /own FUSE mount/,
  );
  await refused(daemon, ["snapshot", "create", "--storage", fuseFile, "--limit", "4M"], /own FUSE mount/);
  await refused(daemon, ["snapshot", "create", "--storage", mountDir, "--limit", "4M"], /own FUSE mount/);

  const bindDir = join(directory, "bind-a");
  await mkdir(bindDir);
  await runOk("mount", ["--bind", mountDir, bindDir]);
  cleanups.push(() => run("umount", ["-l", bindDir]));
  await refused(daemon, ["device", "add", "dup", "--backend", join(bindDir, "d0")], /own FUSE mount/);
  await refused(daemon, ["snapshot", "create", "--storage", bindDir, "--limit", "4M"], /own FUSE mount/);

  const loop = await attachUntilCleanup(fuseFile);
  await refused(daemon, ["device", "add", "dup", "--backend", loop], /own FUSE mount/);
  await refused(daemon, ["snapshot", "create", "--storage", loop, "--limit", "4M"], /own FUSE mount/);
  assert.deepEqual(await listedNames(daemon), ["d0"]);
  assert.equal((await daemon.cliJson<StatusView>(["status"])).snapshots.length, 0);
  assert.deepEqual(await daemon.stop(), { code: 0, signal: null });
});

void test("after kill -9, serve --fuse-mount DIR cleans up the dead mount and mounts again", async (t: TestContext) => {
  const reason = skipReason();
  if (reason) return t.skip(reason);
  const mountDir = join(directory, "fuse-b");
  const first = await startWithFuse("state-b", mountDir);
  await first.cliOk(["device", "add", "d0", "--backend", "memory:", "--size", "1M"]);
  assert.deepEqual(await first.stop("SIGKILL"), { code: null, signal: "SIGKILL" });
  await assert.rejects(stat(mountDir), /ENOTCONN/, "the killed daemon's mount should be dead");

  const second = await startWithFuse("state-b", mountDir);
  const status = await second.cliJson<StatusView>(["status"]);
  assert.equal(status.fuse.mountDir, mountDir);
  // The device came back from the registry and its file is served at the same place.
  assert.equal((await stat(join(mountDir, "d0"))).size, MiB);
  assert.deepEqual(await second.stop(), { code: 0, signal: null });
  const mounts = await readFile("/proc/self/mounts", "utf8");
  assert.ok(!mounts.split("\n").some((line) => line.split(" ")[1] === mountDir), "a mount was left behind");
});

void test("device remove under an ext4 mounted on its FUSE file is EBUSY unless --force", async (t: TestContext) => {
  const reason = skipReason();
  if (reason) return t.skip(reason);
  const mountDir = join(directory, "fuse-c");
  const daemon = await startWithFuse("state-c", mountDir);
  await daemon.cliOk(["device", "add", "d0", "--backend", join(directory, "d0.img"), "--size", "64M"]);
  await daemon.cliOk(["device", "add", "d1", "--backend", "memory:", "--size", "64M"]);
  const loop0 = await attachUntilCleanup(join(mountDir, "d0"));
  const fs0 = join(directory, "ext4-c0");
  await mountExt4(loop0, fs0);

  const result = await daemon.cli(["device", "remove", "d0"]);
  assert.equal(result.code, 1);
  assert.match(result.stderr, new RegExp(`${loop0} mounted at ${fs0}.*--force.*\\(EBUSY\\)`));
  assert.deepEqual(await listedNames(daemon), ["d0", "d1"]);
  assert.deepEqual(await registryNames(daemon), ["d0", "d1"]);
  // The file system still works: the device was not touched.
  await writeFile(join(fs0, "still-here"), "yes");
  await runOk("sync", ["-f", join(fs0, "still-here")]);

  // Unmounted (the loop device may stay attached), the remove goes through.
  await runOk("umount", [fs0]);
  await daemon.cliOk(["device", "remove", "d0"]);
  assert.deepEqual(await registryNames(daemon), ["d1"]);

  // --force removes a device under a mounted file system (which then sees I/O errors).
  const loop1 = await attachUntilCleanup(join(mountDir, "d1"));
  const fs1 = join(directory, "ext4-c1");
  await mountExt4(loop1, fs1);
  assert.equal((await daemon.cli(["device", "remove", "d1"])).code, 1);
  await daemon.cliOk(["device", "remove", "d1", "--force"]);
  assert.deepEqual(await listedNames(daemon), []);
  assert.deepEqual(await registryNames(daemon), []);
  await run("umount", ["-l", fs1]);
  await detachLoop(loop1);
  await daemon.stop("SIGKILL");
});

void test("a device remove whose final flush fails leaves the device listed, saved and serving", async (t: TestContext) => {
  const reason = skipReason() ?? missingTools("nbdcopy", "nbdinfo", "dd");
  if (reason) return t.skip(reason);
  // A loop device over a sparse file on a tmpfs that is then filled: writes land in the page cache, and
  // the final flush's write-back fails with ENOSPC from the tmpfs.
  const tmpfs = join(directory, "tmpfs-d");
  await mkdir(tmpfs);
  await runOk("mount", ["-t", "tmpfs", "-o", "size=16M", "tmpfs", tmpfs]);
  cleanups.push(() => run("umount", ["-l", tmpfs]));
  await runOk("truncate", ["-s", "32M", join(tmpfs, "backing.img")]);
  const loop = await attachUntilCleanup(join(tmpfs, "backing.img"));
  const daemon = await DaemonProcess.start(join(directory, "state-d"));
  daemons.push(daemon);
  await daemon.cliOk(["device", "add", "flaky", "--backend", loop]);
  await daemon.cliOk(["device", "add", "other", "--backend", "memory:", "--size", "1M"]);
  const uri = `nbd+unix:///flaky?socket=${daemon.nbdSocket}`;
  await run("dd", ["if=/dev/zero", `of=${join(tmpfs, "filler")}`, "bs=1M"]);
  // nbdcopy without --flush: the data stays dirty in the page cache.
  const data = join(directory, "data-d");
  await writeFile(data, Buffer.alloc(4 * MiB, 0xa5));
  await runOk("nbdcopy", ["--destination-is-zero", data, uri]);

  for (let attempt = 0; attempt < 2; attempt++) {
    const result = await daemon.cli(["device", "remove", "flaky"]);
    assert.equal(result.code, 1, `the remove should fail: ${result.stdout}`);
    assert.match(result.stderr, /flaky was not removed: its final flush failed/);
    // All or nothing: still listed (in its place), still saved, still serving.
    assert.deepEqual(await listedNames(daemon), ["flaky", "other"]);
    assert.deepEqual(await registryNames(daemon), ["flaky", "other"]);
    assert.match(await runOk("nbdinfo", ["--size", uri]), /33554432/);
    // The error of a failed write-back is reported once; dirty the pages again for the second round.
    await runOk("nbdcopy", ["--destination-is-zero", data, uri]);
  }

  // With space again, the retried remove goes through and is gone from the list and the file.
  await rm(join(tmpfs, "filler"));
  await daemon.cliOk(["device", "remove", "flaky"]);
  assert.deepEqual(await listedNames(daemon), ["other"]);
  assert.deepEqual(await registryNames(daemon), ["other"]);
  assert.deepEqual(await daemon.stop(), { code: 0, signal: null });
});

/**
 * A stop never cuts off a mounted file system by surprise: with an ext4 mounted on a loop device over a
 * device's FUSE file, SIGTERM leaves the daemon serving (the file system keeps working, an error is
 * logged) until the unmount, then it stops with code 0. A second signal, or the end of --stop-wait, stops
 * it anyway.
 */
import assert from "node:assert/strict";
import { mkdir, mkdtemp, readFile, rm, writeFile } from "node:fs/promises";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { after, before, type TestContext, test } from "node:test";
import type { DeviceView } from "../../src/daemon/api-types.js";
import { isRoot, missingTools, run, runOk } from "../helpers/commands.js";
import { attachLoop, detachLoop, detachLoopOk } from "../helpers/loop-device.js";
import { DaemonProcess } from "./cli-harness.js";

const waitingMessage = "still serving until they are unmounted";
const exitBoundMs = 30_000;
let directory = "";

before(async () => {
  directory = await mkdtemp(join(tmpdir(), "blocksnap-stop-mounted-"));
});

after(async () => {
  await rm(directory, { recursive: true, force: true });
});

function skipReason(): string | null {
  if (!isRoot) return "needs root (FUSE, losetup, mount)";
  return missingTools("losetup", "mkfs.ext4", "mount", "umount") ?? null;
}

interface MountedDevice {
  readonly daemon: DaemonProcess;
  readonly loopDevice: string;
  readonly mountPoint: string;
}

async function mountedDevice(name: string, stopWaitSeconds: number): Promise<MountedDevice> {
  const stateDir = join(directory, name);
  const daemon = await DaemonProcess.start(stateDir, {
    args: ["--nbd-listen", "none", "--stop-wait", String(stopWaitSeconds)],
  });
  const device = await daemon.cliJson<DeviceView>([
    "device",
    "add",
    "d0",
    "--backend",
    "memory:",
    "--size",
    "64M",
  ]);
  assert.ok(device.fusePath);
  const loopDevice = await attachLoop(device.fusePath);
  const mountPoint = join(directory, `${name}-mnt`);
  await mkdir(mountPoint);
  try {
    await runOk("mkfs.ext4", ["-q", "-F", loopDevice], 60_000);
    await runOk("mount", [loopDevice, mountPoint]);
  } catch (error) {
    await detachLoop(loopDevice);
    await daemon.stop("SIGKILL");
    throw error;
  }
  return { daemon, loopDevice, mountPoint };
}

async function cleanUp(mounted: MountedDevice): Promise<void> {
  await run("umount", ["-l", mounted.mountPoint]);
  await detachLoop(mounted.loopDevice);
  await mounted.daemon.stop("SIGKILL");
}

async function waitFor(condition: () => boolean, what: string): Promise<void> {
  for (let attempt = 0; attempt < 1500; attempt++) {
    if (condition()) return;
    await new Promise((resolve) => setTimeout(resolve, 20));
  }
  assert.fail(`timed out waiting for ${what}`);
}

async function exitWithin(daemon: DaemonProcess): Promise<{ code: number | null; signal: string | null }> {
  let timer: NodeJS.Timeout | undefined;
  const timeout = new Promise<never>((_resolve, reject) => {
    timer = setTimeout(() => reject(new Error(`daemon did not exit:\n${daemon.stderr}`)), exitBoundMs);
  });
  try {
    return await Promise.race([daemon.exited, timeout]);
  } finally {
    clearTimeout(timer);
  }
}

function skipped(t: TestContext): boolean {
  const reason = skipReason();
  if (reason !== null) t.skip(reason);
  return reason !== null;
}

void test("SIGTERM with an ext4 mounted on a device: the daemon keeps serving until the unmount, then exits 0", async (t) => {
  if (skipped(t)) return;
  const mounted = await mountedDevice("wait", 600);
  try {
    mounted.daemon.child.kill("SIGTERM");
    await waitFor(() => mounted.daemon.stderr.includes(waitingMessage), "the waiting message");
    assert.match(
      mounted.daemon.stderr,
      new RegExp(`"level":50.*${mounted.mountPoint.replace(/\//g, "\\/")}`),
    );
    // Still serving: the file system takes writes that reach the device, and the API answers.
    await writeFile(join(mounted.mountPoint, "after-sigterm"), "kept\n");
    await runOk("sync", ["-f", join(mounted.mountPoint, "after-sigterm")]);
    const status = await mounted.daemon.cli(["status"]);
    assert.equal(status.code, 0, status.stderr);
    assert.equal(mounted.daemon.child.exitCode, null, "the daemon is still running");

    await runOk("umount", [mounted.mountPoint]);
    await detachLoopOk(mounted.loopDevice);
    assert.deepEqual(await exitWithin(mounted.daemon), { code: 0, signal: null });
    assert.doesNotMatch(await readFile("/proc/self/mounts", "utf8"), new RegExp(` ${mounted.mountPoint} `));
  } finally {
    await cleanUp(mounted);
  }
});

void test("a second SIGTERM stops the daemon although a file system is still mounted", async (t) => {
  if (skipped(t)) return;
  const mounted = await mountedDevice("second", 600);
  try {
    mounted.daemon.child.kill("SIGTERM");
    await waitFor(() => mounted.daemon.stderr.includes(waitingMessage), "the waiting message");
    mounted.daemon.child.kill("SIGTERM");
    assert.deepEqual(await exitWithin(mounted.daemon), { code: 0, signal: null });
    assert.match(mounted.daemon.stderr, /second signal: stopping although file systems are still mounted/);
  } finally {
    await cleanUp(mounted);
  }
});

void test("--stop-wait ends the wait: the daemon stops on its own and says what was still mounted", async (t) => {
  if (skipped(t)) return;
  const mounted = await mountedDevice("timeout", 1);
  try {
    mounted.daemon.child.kill("SIGTERM");
    assert.deepEqual(await exitWithin(mounted.daemon), { code: 0, signal: null });
    assert.match(mounted.daemon.stderr, /still mounted after the stop wait/);
  } finally {
    await cleanUp(mounted);
  }
});

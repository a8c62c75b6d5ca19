/**
 * `snapshot destroy` never cuts an image out from under its users: while a snapshot image's FUSE file is
 * open through a loop device (an ext4 mounted on it, or the loop device only attached), destroy answers
 * EBUSY with one line naming the loop device and the mount point; once unmounted and detached it works,
 * and `--force` destroys anyway. Through the real daemon, losetup and mount. Root only; every mount and
 * loop device is undone in `after`, also when a test fails.
 */
import assert from "node:assert/strict";
import { mkdir, mkdtemp, readdir, rm } from "node:fs/promises";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { after, before, type TestContext, test } from "node:test";
import type { SnapshotView } from "../../src/daemon/api-types.js";
import { isRoot, missingTools, run, runOk } from "../helpers/commands.js";
import { attachLoop, detachLoop } from "../helpers/loop-device.js";
import { DaemonProcess } from "./cli-harness.js";

let directory = "";
let daemon: DaemonProcess | null = null;
/** Undone in reverse order in `after`: umount, losetup -d. */
const cleanups: (() => Promise<unknown>)[] = [];

before(async () => {
  directory = await mkdtemp(join(tmpdir(), "blocksnap-destroy-in-use-"));
});

after(async () => {
  for (const cleanup of cleanups.reverse()) await cleanup().catch(() => {});
  await daemon?.stop("SIGKILL");
  await rm(directory, { recursive: true, force: true });
});

function skipReason(): string | undefined {
  if (!isRoot) return "needs root (FUSE, losetup, mount)";
  return missingTools("losetup", "mkfs.ext4", "mount", "umount");
}

async function takenImage(running: DaemonProcess): Promise<{ id: string; fusePath: string }> {
  const id = (
    await running.cliOk(["snapshot", "create", "--storage", "memory:", "--limit", "16M", "--device", "d0"])
  ).trim();
  const info = await running.cliJson<SnapshotView>(["snapshot", "take", id]);
  const fusePath = info.devices[0]?.fusePath;
  assert.ok(fusePath, `no FUSE file for the image: ${JSON.stringify(info)}`);
  return { id, fusePath };
}

async function mountImage(fusePath: string, name: string): Promise<{ loop: string; mountPoint: string }> {
  const loop = await attachLoop(fusePath);
  cleanups.push(() => detachLoop(loop));
  const mountPoint = join(directory, name);
  await mkdir(mountPoint);
  // Read-only without journal replay: the image is a frozen view, nothing needs to be written.
  await runOk("mount", ["-o", "ro,noload", loop, mountPoint]);
  cleanups.push(() => run("umount", ["-l", mountPoint]));
  return { loop, mountPoint };
}

async function destroyRefused(running: DaemonProcess, id: string, message: RegExp): Promise<void> {
  const result = await running.cli(["snapshot", "destroy", id]);
  assert.equal(result.code, 1, `destroy should be refused: ${result.stdout}`);
  assert.match(result.stderr, message);
  assert.equal(result.stderr.trim().split("\n").length, 1, `one line: ${result.stderr}`);
  assert.equal((await running.cliJson<SnapshotView>(["snapshot", "info", id])).state, "taken");
}

void test("destroy of a snapshot whose image is mounted or attached is EBUSY; unmounted and detached it works; --force", async (t: TestContext) => {
  const reason = skipReason();
  if (reason) return t.skip(reason);
  const backend = join(directory, "d0.img");
  await runOk("truncate", ["-s", "64M", backend]);
  await runOk("mkfs.ext4", ["-q", "-F", backend], 60_000);
  daemon = await DaemonProcess.start(join(directory, "state"), { args: ["--nbd-listen", "none"] });
  await daemon.cliOk(["device", "add", "d0", "--backend", backend]);

  const first = await takenImage(daemon);
  const { loop, mountPoint } = await mountImage(first.fusePath, "mnt-a");
  await destroyRefused(
    daemon,
    first.id,
    new RegExp(`${loop} mounted at ${mountPoint}.*--force.*\\(EBUSY\\)`),
  );
  // The mounted image still reads: nothing was torn down.
  assert.ok((await readdir(mountPoint)).includes("lost+found"));
  await runOk("umount", [mountPoint]);
  // Still open through the attached loop device.
  await destroyRefused(daemon, first.id, new RegExp(`${loop} attached.*\\(EBUSY\\)`));
  await detachLoop(loop);
  assert.match(await daemon.cliOk(["snapshot", "destroy", first.id]), /destroyed/);

  const second = await takenImage(daemon);
  const forced = await mountImage(second.fusePath, "mnt-b");
  await destroyRefused(daemon, second.id, new RegExp(`${forced.loop} mounted at ${forced.mountPoint}`));
  assert.match(await daemon.cliOk(["snapshot", "destroy", second.id, "--force"]), /destroyed/);
  assert.deepEqual((await daemon.cliJson<{ snapshots: unknown[] }>(["snapshot", "list"])).snapshots, []);
  await run("umount", ["-l", forced.mountPoint]);
  await detachLoop(forced.loop);
  assert.deepEqual(await daemon.stop(), { code: 0, signal: null });
  daemon = null;
});

/**
 * A difference storage on a file system that lives on one of the snapshot's own devices is refused
 * (issue 17: the take would hang in the freeze): an ext4 mounted on a loop device over device d0's FUSE
 * file holds a directory and a file; `snapshot create` with either as storage and d0 as member is refused
 * with one line naming d0 and the mount point, as are `snapshot add` of d0 to a snapshot stored there and
 * `append-storage` of it to a snapshot of d0; a snapshot of another device may use it, and `--force`
 * overrides. Nothing is ever taken here, so nothing can hang in a freeze; as a safety net, a test that
 * runs too long aborts the daemon's FUSE connection (fusectl) so that the mount and loop device let go.
 * Root only; every mount, loop device and process is undone in `after`.
 */
import assert from "node:assert/strict";
import { mkdir, mkdtemp, rm } from "node:fs/promises";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { after, before, type TestContext, test } from "node:test";
import type { DeviceView, StatusView } from "../../src/daemon/api-types.js";
import { abortConnection, blocksnapMountsAt } from "../../src/fuse/fuse-mount.js";
import { isRoot, missingTools, run, runOk } from "../helpers/commands.js";
import { attachLoop, detachLoop } from "../helpers/loop-device.js";
import { DaemonProcess } from "./cli-harness.js";

const safetyNetMs = 180_000;
let directory = "";
let daemon: DaemonProcess | null = null;
/** Undone in reverse order in `after`: umount, losetup -d. */
const cleanups: (() => Promise<unknown>)[] = [];

before(async () => {
  directory = await mkdtemp(join(tmpdir(), "blocksnap-storage-on-member-"));
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

/** Aborts the FUSE connection of the mount at `mountDir` after `ms` unless cancelled: nothing stays stuck. */
function fuseSafetyNet(mountDir: string, ms: number): () => void {
  const timer = setTimeout(() => {
    void blocksnapMountsAt(mountDir).then(async (mounts) => {
      for (const mount of mounts) await abortConnection(mount.deviceNumber, console);
    });
  }, ms);
  return () => clearTimeout(timer);
}

async function refused(running: DaemonProcess, args: readonly string[], message: RegExp): Promise<void> {
  const result = await running.cli(args);
  assert.equal(result.code, 1, `blocksnap ${args.join(" ")} should fail: ${result.stdout}`);
  assert.match(result.stderr, message, `blocksnap ${args.join(" ")}`);
  assert.equal(result.stderr.trim().split("\n").length, 1, `one line: ${result.stderr}`);
  await running.cliJson<StatusView>(["status"]);
}

void test("a storage on an ext4 that lives on a member device is refused at create, add and append-storage; --force overrides", async (t: TestContext) => {
  const reason = skipReason();
  if (reason) return t.skip(reason);
  const mountDir = join(directory, "fuse");
  daemon = await DaemonProcess.start(join(directory, "state"), {
    args: ["--nbd-listen", "none", "--fuse-mount", mountDir],
  });
  const cancelSafetyNet = fuseSafetyNet(mountDir, safetyNetMs);
  try {
    const d0 = await daemon.cliJson<DeviceView>([
      "device",
      "add",
      "d0",
      "--backend",
      "memory:",
      "--size",
      "64M",
    ]);
    await daemon.cliOk(["device", "add", "d1", "--backend", "memory:", "--size", "64M"]);
    assert.ok(d0.fusePath);
    const loop = await attachLoop(d0.fusePath);
    cleanups.push(() => detachLoop(loop));
    await runOk("mkfs.ext4", ["-q", "-F", loop], 60_000);
    const mountPoint = join(directory, "on-d0");
    await mkdir(mountPoint);
    await runOk("mount", [loop, mountPoint]);
    cleanups.push(() => run("umount", ["-l", mountPoint]));
    const storageDir = join(mountPoint, "diff");
    await mkdir(storageDir);
    const storageFile = join(mountPoint, "diff.img");
    const onD0 = new RegExp(
      `of d0: it is on ${mountPoint} \\(ext4 on ${loop} over device d0\\).*--force.*\\(EINVAL\\)`,
    );

    const create = (storage: string, device: string, ...more: string[]) => [
      "snapshot",
      "create",
      "--storage",
      storage,
      "--limit",
      "8M",
      "--device",
      device,
      ...more,
    ];
    // A directory, a file that does not exist yet, and one that does.
    await refused(daemon, create(storageDir, "d0"), onD0);
    await refused(daemon, create(storageFile, "d0"), onD0);
    await runOk("truncate", ["-s", "8M", storageFile]);
    await refused(daemon, create(storageFile, "d0"), onD0);
    assert.deepEqual((await daemon.cliJson<{ snapshots: unknown[] }>(["snapshot", "list"])).snapshots, []);

    // A snapshot of d1 may keep its storage there; adding d0 to it is refused.
    const ofD1 = (await daemon.cliOk(create(storageDir, "d1"))).trim();
    await refused(daemon, ["snapshot", "add", ofD1, "--device", "d0"], onD0);
    // A snapshot of d0 stored elsewhere cannot grow onto it.
    const elsewhere = join(directory, "elsewhere");
    await mkdir(elsewhere);
    const ofD0 = (await daemon.cliOk(create(elsewhere, "d0"))).trim();
    await refused(
      daemon,
      ["snapshot", "append-storage", ofD0, "--storage", storageDir, "--size", "4M"],
      onD0,
    );
    await daemon.cliOk(["snapshot", "destroy", ofD0]);

    // --force overrides each (nothing is taken: the take would hang).
    await daemon.cliOk(["snapshot", "add", ofD1, "--device", "d0", "--force"]);
    await daemon.cliOk(["snapshot", "destroy", ofD1]);
    const forced = (await daemon.cliOk(create(storageDir, "d0", "--force"))).trim();
    await daemon.cliOk(["snapshot", "destroy", forced]);
    assert.match(daemon.stderr, /storage on a member device accepted \(forced\)/);

    await runOk("umount", [mountPoint]);
    await detachLoop(loop);
    assert.deepEqual(await daemon.stop(), { code: 0, signal: null });
    daemon = null;
  } finally {
    cancelSafetyNet();
  }
});

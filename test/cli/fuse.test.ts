/**
 * The FUSE face as the daemon sets it up by default when root: mounted at `<state>/mnt`, origin and image
 * files at the paths `device add` and `snapshot info` print, the image keeping the data of the take, and
 * the mount gone after SIGTERM. An explicit `--fuse-mount` that cannot be mounted fails the start.
 */
import assert from "node:assert/strict";
import { mkdtemp, open, readFile, rm, writeFile } from "node:fs/promises";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { after, before, test } from "node:test";
import type { DeviceView, SnapshotView, StatusView } from "../../src/daemon/api-types.js";
import { DaemonProcess, runCli } from "./cli-harness.js";

const isRoot = process.getuid?.() === 0;
let directory = "";

before(async () => {
  directory = await mkdtemp(join(tmpdir(), "blocksnap-cli-fuse-"));
});

after(async () => {
  await rm(directory, { recursive: true, force: true });
});

async function isMounted(mountDir: string): Promise<boolean> {
  const mounts = await readFile("/proc/self/mounts", "utf8");
  return mounts.split("\n").some((line) => line.split(" ")[1] === mountDir);
}

void test("as root, serve mounts FUSE at <state>/mnt by default; files at the printed paths; unmounted at SIGTERM", async (t) => {
  if (!isRoot) return t.skip("mounting FUSE needs root");
  const stateDir = join(directory, "state");
  const mountDir = join(stateDir, "mnt");
  const daemon = await DaemonProcess.start(stateDir, { args: ["--nbd-listen", "none"] });
  try {
    const status = await daemon.cliJson<StatusView>(["status"]);
    assert.equal(status.fuse.mountDir, mountDir);
    assert.ok(await isMounted(mountDir));

    const device = await daemon.cliJson<DeviceView>([
      "device",
      "add",
      "f0",
      "--backend",
      "memory:",
      "--size",
      "1M",
    ]);
    assert.equal(device.fusePath, join(mountDir, "f0"));
    await writeFile(device.fusePath!, Buffer.alloc(64 * 1024, 0x5a), { flag: "r+" });

    const id = (
      await daemon.cliOk(["snapshot", "create", "--storage", "memory:", "--limit", "4M", "--device", "f0"])
    ).trim();
    await daemon.cliOk(["snapshot", "take", id, "--no-freeze"]);
    const file = await open(device.fusePath!, "r+");
    try {
      await file.write(Buffer.alloc(64 * 1024, 0xa5), 0, 64 * 1024, 0);
    } finally {
      await file.close();
    }
    const info = await daemon.cliJson<SnapshotView>(["snapshot", "info", id]);
    const imagePath = info.devices[0]?.fusePath;
    assert.equal(imagePath, join(mountDir, `f0@${id}`));
    const image = await readFile(imagePath!);
    assert.equal(image.byteLength, 1024 * 1024);
    assert.ok(
      image.subarray(0, 64 * 1024).every((byte) => byte === 0x5a),
      "the image keeps the data of the take",
    );
    assert.ok((await readFile(device.fusePath!)).subarray(0, 64 * 1024).every((byte) => byte === 0xa5));
  } finally {
    assert.equal((await daemon.stop()).code, 0, daemon.stderr);
  }
  assert.equal(await isMounted(mountDir), false);
});

void test("an explicit --fuse-mount that cannot be mounted fails the start with one clear line", async () => {
  const stateDir = join(directory, "explicit");
  const notADirectory = join(directory, "plain-file");
  await writeFile(notADirectory, "");
  const result = await runCli([
    "serve",
    "--state-dir",
    stateDir,
    "--nbd-listen",
    "none",
    "--fuse-mount",
    join(notADirectory, "mnt"),
  ]);
  assert.equal(result.code, 1);
  const messages = result.stderr.split("\n").filter((line) => line.startsWith("blocksnap: "));
  assert.equal(messages.length, 1, result.stderr);
  assert.match(messages[0]!, /cannot mount FUSE at .*plain-file\/mnt/);
});

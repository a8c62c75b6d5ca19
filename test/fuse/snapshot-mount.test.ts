// The whole product through FUSE: an ext4 on the origin's loop device, a snapshot taken with the file
// system frozen (LoopFreezer), the image looped and mounted read-write next to the origin, writes on
// either side invisible to the other, both clean under e2fsck; and an image destroyed under a reader.
import assert from "node:assert/strict";
import { type ChildProcess, spawn } from "node:child_process";
import { mkdir, mkdtemp, rm } from "node:fs/promises";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { type TestContext, test } from "node:test";
import { Engine } from "../../src/engine/engine.js";
import { LoopFreezer } from "../../src/freeze/loop-freezer.js";
import { FuseServer } from "../../src/fuse/fuse-server.js";
import { must, run, skipReason } from "./fuse-fixture.js";

const MiB = 1024 * 1024;

/** An Engine served over FUSE in a temp dir, with loop devices and mounts undone at cleanup. */
class EngineFixture {
  readonly directory: string;
  readonly mountDir: string;
  readonly engine: Engine;
  server: FuseServer | undefined;
  private readonly loops: string[] = [];
  private readonly mounts: string[] = [];

  private constructor(directory: string) {
    this.directory = directory;
    this.mountDir = join(directory, "mnt");
    const mountDir = this.mountDir;
    this.engine = new Engine({
      freezer: new LoopFreezer({ deviceFilePath: (name) => join(mountDir, name) }),
    });
  }

  static async create(t: TestContext): Promise<EngineFixture | undefined> {
    const reason = await skipReason(["mkfs.ext4", "e2fsck", "sha256sum", "fsfreeze", "dd"]);
    if (reason) {
      t.skip(reason);
      return undefined;
    }
    const fixture = new EngineFixture(await mkdtemp(join(tmpdir(), "blocksnap-fuse-snap-")));
    t.after(() => fixture.cleanup());
    fixture.server = await FuseServer.mount(fixture.engine, { mountDir: fixture.mountDir });
    return fixture;
  }

  async attachLoop(name: string, readOnly = false): Promise<string> {
    const args = ["--direct-io=on", ...(readOnly ? ["-r"] : []), "-f", "--show", join(this.mountDir, name)];
    const device = (await must("losetup", args)).trim();
    this.loops.push(device);
    return device;
  }

  async detachLoop(device: string): Promise<void> {
    await must("losetup", ["-d", device]);
    this.loops.splice(this.loops.indexOf(device), 1);
  }

  async mountFs(device: string, label: string): Promise<string> {
    const target = join(this.directory, label);
    await mkdir(target, { recursive: true });
    await must("mount", [device, target]);
    this.mounts.push(target);
    return target;
  }

  async unmountFs(target: string, lazy = false): Promise<void> {
    await must("umount", [...(lazy ? ["-l"] : []), target]);
    this.mounts.splice(this.mounts.indexOf(target), 1);
  }

  async cleanup(): Promise<void> {
    for (const target of this.mounts.reverse()) await run("umount", ["-l", target]);
    for (const device of this.loops.reverse()) await run("losetup", ["-d", device]);
    await this.server?.unmount();
    await this.engine.close();
    await rm(this.directory, { recursive: true, force: true });
  }
}

async function writeFiles(directory: string, prefix: string): Promise<string> {
  const script = [
    "set -e",
    'cd "$1"',
    'for i in 1 2 3 4 5; do head -c $((i * 900001 + 3)) /dev/urandom > "$2$i"; done',
    "sync",
    'sha256sum "$2"*',
  ].join("\n");
  return must("sh", ["-c", script, "sh", directory, prefix]);
}

async function checksums(directory: string, prefix: string): Promise<string> {
  return must("sh", ["-c", 'cd "$1" && sha256sum "$2"*', "sh", directory, prefix]);
}

async function exists(path: string): Promise<boolean> {
  return (await run("test", ["-e", path])).exitCode === 0;
}

function exitOf(child: ChildProcess): Promise<number | null> {
  if (child.exitCode !== null || child.signalCode !== null) return Promise.resolve(child.exitCode);
  return new Promise((resolve) => child.once("exit", (code) => resolve(code)));
}

test("snapshot of a mounted ext4 over FUSE: the image mounts read-write with the pre-snapshot files, writes stay on their side, both fsck clean", async (t) => {
  const fixture = await EngineFixture.create(t);
  if (!fixture) return;
  const { engine } = fixture;
  await engine.addDevice({
    name: "disk0",
    backendPath: join(fixture.directory, "disk0.img"),
    sizeBytes: 256 * MiB,
  });
  const origin = await fixture.attachLoop("disk0");
  await must("mkfs.ext4", ["-q", "-F", origin]);
  const originFs = await fixture.mountFs(origin, "origin");
  const before = await writeFiles(originFs, "before-");

  const snapshot = await engine.createSnapshot({
    storage: fixture.directory,
    limitBytes: 512 * MiB,
    devices: ["disk0"],
  });
  const taken = await engine.takeSnapshot(snapshot.id);
  assert.equal(taken.state, "taken");
  const frozen = taken.takeReport?.frozen ?? [];
  assert.deepEqual(
    frozen.map((entry) => ({ device: entry.device, mountPoint: entry.mountPoint, error: entry.error })),
    [{ device: "disk0", mountPoint: originFs, error: null }],
    "the origin's file system was frozen around the take, through the FUSE file",
  );
  const after = await writeFiles(originFs, "after-");

  const imageName = `disk0@${snapshot.id}`;
  assert.ok(await exists(join(fixture.mountDir, imageName)), "the image appears as a file");
  const image = await fixture.attachLoop(imageName);
  let imageFs = await fixture.mountFs(image, "image");
  assert.equal(await checksums(imageFs, "before-"), before, "pre-snapshot files are in the image");
  assert.equal(await exists(join(imageFs, "after-1")), false, "post-snapshot files are not");
  const imageOnly = await writeFiles(imageFs, "image-");
  await fixture.unmountFs(imageFs);
  imageFs = await fixture.mountFs(image, "image");
  assert.equal(
    await checksums(imageFs, "image-"),
    imageOnly,
    "writes into the image persist across a remount",
  );
  assert.equal(await exists(join(originFs, "image-1")), false, "the origin does not see the image's writes");
  assert.equal(await checksums(originFs, "after-"), after);

  await fixture.unmountFs(imageFs);
  await fixture.unmountFs(originFs);
  for (const device of [origin, image]) {
    const fsck = await run("e2fsck", ["-fn", device]);
    assert.equal(fsck.exitCode, 0, `e2fsck -fn ${device}:\n${fsck.stdout}${fsck.stderr}`);
  }
  await fixture.detachLoop(image);
  await fixture.detachLoop(origin);
});

test("destroying a snapshot under a reader of its image's loop device: I/O errors, no hang, the file vanishes, the origin serves on", async (t) => {
  const fixture = await EngineFixture.create(t);
  if (!fixture) return;
  const { engine } = fixture;
  await engine.addDevice({
    name: "disk1",
    backendPath: join(fixture.directory, "disk1.img"),
    sizeBytes: 64 * MiB,
  });
  const origin = await fixture.attachLoop("disk1");
  await must("dd", ["if=/dev/urandom", `of=${origin}`, "bs=1M", "count=64", "oflag=direct", "status=none"]);
  const snapshot = await engine.createSnapshot({
    storage: "memory:",
    limitBytes: 128 * MiB,
    devices: ["disk1"],
  });
  await engine.takeSnapshot(snapshot.id, { noFreeze: true });
  const imageName = `disk1@${snapshot.id}`;
  const image = await fixture.attachLoop(imageName, true);

  // Readers of the image and writers of the origin (copy-before-write) at once.
  const script = [
    "i=0",
    "while [ $i -lt 50 ]; do",
    '  dd if="$1" of=/dev/null bs=1M iflag=direct status=none || { echo failed; exit 3; }',
    '  dd if=/dev/urandom of="$2" bs=1M count=4 seek=$((i % 60)) oflag=direct status=none || exit 4',
    "  echo pass; i=$((i + 1))",
    "done",
  ].join("\n");
  const worker = spawn("sh", ["-c", script, "load", image, origin], { stdio: ["ignore", "pipe", "pipe"] });
  t.after(() => {
    if (worker.exitCode === null) worker.kill("SIGKILL");
  });
  let errors = "";
  worker.stderr.on("data", (chunk: Buffer) => {
    errors += chunk.toString();
  });
  await new Promise<void>((resolve, reject) => {
    worker.stdout.on("data", (chunk: Buffer) => {
      if (chunk.toString().includes("pass")) resolve();
    });
    worker.once("exit", (code) => reject(new Error(`load ended early (${code}): ${errors}`)));
  });

  await engine.destroySnapshot(snapshot.id);
  assert.equal(await exitOf(worker), 3, `the image reader must fail with an I/O error: ${errors}`);
  assert.match(errors, /Input\/output error/);
  assert.equal(await exists(join(fixture.mountDir, imageName)), false, "the image file is gone");
  await fixture.detachLoop(image);
  const read = await run("dd", [`if=${origin}`, "of=/dev/null", "bs=1M", "iflag=direct", "status=none"]);
  assert.equal(read.exitCode, 0, `the origin keeps serving: ${read.stderr}`);
  await fixture.detachLoop(origin);
});

// The whole product through FUSE: an ext4 on the origin's loop device, a snapshot taken with the file
// system frozen (LoopFreezer), the image looped and mounted read-write next to the origin, writes on
// either side invisible to the other, both clean under e2fsck; an image destroyed under a reader of its
// loop device; and a snapshot destroyed while its image's file system is mounted, read and written.
import assert from "node:assert/strict";
import { spawn } from "node:child_process";
import { join } from "node:path";
import { test } from "node:test";
import {
  boundedBy,
  checksums,
  directChecksum,
  EngineFixture,
  exists,
  exitOf,
  MiB,
  startLoad,
  writeFiles,
} from "./engine-fixture.js";
import { must, run } from "./fuse-fixture.js";

const snapshotTools = ["mkfs.ext4", "e2fsck", "sha256sum", "fsfreeze", "dd"];

test("snapshot of a mounted ext4 over FUSE: the image mounts read-write with the pre-snapshot files, writes stay on their side, both fsck clean", async (t) => {
  const fixture = await EngineFixture.create(t, snapshotTools);
  if (!fixture) return;
  const { engine } = fixture;
  await fixture.addDevice("disk0", 256 * MiB);
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
  const fixture = await EngineFixture.create(t, snapshotTools);
  if (!fixture) return;
  const { engine } = fixture;
  await fixture.addDevice("disk1", 64 * MiB);
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
  fixture.adopt(worker);
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

test("destroying a snapshot while its image's file system is mounted, read and written: bounded destroy, I/O errors, umount -l, the origin serves on (FUSE and NBD)", async (t) => {
  const fixture = await EngineFixture.create(t, [...snapshotTools, "nbdcopy", "nbdinfo"], { nbd: true });
  if (!fixture) return;
  const { engine } = fixture;
  await fixture.addDevice("disk2", 128 * MiB);
  const origin = await fixture.attachLoop("disk2");
  await must("mkfs.ext4", ["-q", "-F", origin]);
  const originFs = await fixture.mountFs(origin, "origin");
  await must("sh", ["-c", 'head -c 24000000 /dev/urandom > "$1/big" && sync', "sh", originFs]);
  const snapshot = await engine.createSnapshot({
    storage: fixture.directory,
    limitBytes: 256 * MiB,
    devices: ["disk2"],
  });
  await engine.takeSnapshot(snapshot.id);
  const imageName = `disk2@${snapshot.id}`;
  const image = await fixture.attachLoop(imageName);
  const imageFs = await fixture.mountFs(image, "image");

  // O_DIRECT in both loops: every round goes through the loop device to the FUSE file, none stays cached.
  const reader = startLoad(
    fixture,
    "reader",
    [
      "while :; do",
      '  dd if="$1/big" of=/dev/null bs=1M iflag=direct status=none || exit 3',
      "  echo pass",
      "done",
    ].join("\n"),
    [imageFs],
  );
  const writer = startLoad(
    fixture,
    "writer",
    [
      "i=0",
      "while :; do",
      '  dd if=/dev/urandom of="$1/new-$((i % 4))" bs=1M count=2 oflag=direct conv=fsync status=none || exit 4',
      "  echo pass; i=$((i + 1))",
      "done",
    ].join("\n"),
    [imageFs],
  );
  await Promise.all([reader.running, writer.running]);

  await boundedBy(engine.destroySnapshot(snapshot.id), 30_000, "destroySnapshot under load");
  const readerExit = await boundedBy(reader.exited, 30_000, "the image reader");
  const writerExit = await boundedBy(writer.exited, 30_000, "the image writer");
  t.diagnostic(`reader: ${reader.stderr().trim()}; writer: ${writer.stderr().trim()}`);
  assert.equal(readerExit, 3, `the reader must fail: ${reader.stderr()}`);
  assert.match(reader.stderr(), /Input\/output error/);
  assert.equal(writerExit, 4, `the writer must fail: ${writer.stderr()}`);
  // ext4 may have turned itself read-only at the first failed journal write.
  assert.match(writer.stderr(), /Input\/output error|Read-only file system/);
  assert.equal(await exists(fixture.filePath(imageName)), false, "the image file is gone");
  const listed = await run("nbdinfo", [fixture.nbdUri(imageName)]);
  assert.notEqual(listed.exitCode, 0, "the image export is gone from NBD");

  await boundedBy(fixture.unmountFs(imageFs, true), 30_000, "umount -l of the image");
  await fixture.detachLoop(image);

  // The origin: a direct write and read back through its loop device, and the same bytes over NBD.
  const after = await must("sh", [
    "-c",
    [
      "set -e",
      'head -c 3000000 /dev/urandom > "$2/after.src"',
      'dd if="$2/after.src" of="$1/after" bs=1M oflag=direct conv=fsync status=none',
      'dd if="$1/after" bs=1M iflag=direct status=none | sha256sum',
      'sha256sum < "$2/after.src"',
    ].join("\n"),
    "sh",
    originFs,
    fixture.directory,
  ]);
  const [readBack, written] = after.trim().split("\n");
  assert.equal(readBack, written, "a file written into the origin after destroy reads back");
  await fixture.unmountFs(originFs);
  const viaNbd = join(fixture.directory, "origin-via-nbd.img");
  await must("nbdcopy", [fixture.nbdUri("disk2"), viaNbd]);
  assert.equal(
    await directChecksum(viaNbd),
    await directChecksum(origin),
    "NBD serves the same origin bytes as the loop device",
  );
  const fsck = await run("e2fsck", ["-fn", origin]);
  assert.equal(fsck.exitCode, 0, `e2fsck -fn on the origin:\n${fsck.stdout}${fsck.stderr}`);
  await fixture.detachLoop(origin);
});

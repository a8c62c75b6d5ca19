// Real file systems on a loop device over a blocksnap FUSE file: mkfs, mount, write, remount, verify, fsck.
// Proven with the kernel's own ext4 and XFS drivers and their checkers, not with our code.
import assert from "node:assert/strict";
import { test } from "node:test";
import { FuseFixture, must, run } from "./fuse-fixture.js";

const MiB = 1024 * 1024;

/** Writes files of odd sizes (and a subdirectory) with random content; returns their sha256sum listing. */
async function writeFiles(directory: string): Promise<string> {
  const script = [
    "set -e",
    'cd "$1"',
    "mkdir -p sub",
    'for i in 1 2 3 4 5 6 7 8; do head -c $((i * 700001 + 17)) /dev/urandom > "f$i"; done',
    "head -c 5000000 /dev/urandom > sub/big",
    "sync",
    "sha256sum f* sub/*",
  ].join("\n");
  return must("sh", ["-c", script, "sh", directory]);
}

async function checksums(directory: string): Promise<string> {
  return must("sh", ["-c", 'cd "$1" && sha256sum f* sub/*', "sh", directory]);
}

async function fileSystemRoundTrip(
  fixture: FuseFixture,
  mkfs: readonly string[],
  check: readonly string[],
  sizeBytes: number,
): Promise<void> {
  fixture.addFileExport("disk0", sizeBytes);
  const loop = await fixture.attachLoop("disk0");
  assert.match((await must("losetup", ["--list", "--noheadings", "-O", "DIO", loop])).trim(), /^1$/);
  await must(mkfs[0]!, [...mkfs.slice(1), loop]);
  let target = await fixture.mountFs(loop, "fs");
  const written = await writeFiles(target);
  assert.equal(written.trim().split("\n").length, 9);
  await fixture.unmountFs(target);
  target = await fixture.mountFs(loop, "fs");
  assert.equal(await checksums(target), written, "every file reads back after a remount");
  await fixture.unmountFs(target);
  const fsck = await run(check[0]!, [...check.slice(1), loop]);
  assert.equal(fsck.exitCode, 0, `${check.join(" ")} found problems:\n${fsck.stdout}${fsck.stderr}`);
  await fixture.detachLoop(loop);
}

test("ext4 on a loop device over a FUSE file: mkfs, mount, write, remount, checksums, e2fsck clean", async (t) => {
  const fixture = await FuseFixture.create(t, ["mkfs.ext4", "e2fsck", "sha256sum"]);
  if (!fixture) return;
  await fileSystemRoundTrip(fixture, ["mkfs.ext4", "-q", "-F"], ["e2fsck", "-fn"], 256 * MiB);
});

test("XFS on a loop device over a FUSE file: mkfs, mount, write, remount, checksums, xfs_repair -n clean", async (t) => {
  const fixture = await FuseFixture.create(t, ["mkfs.xfs", "xfs_repair", "sha256sum"]);
  if (!fixture) return;
  await fileSystemRoundTrip(fixture, ["mkfs.xfs", "-q", "-f"], ["xfs_repair", "-n"], 320 * MiB);
});

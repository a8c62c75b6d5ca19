// A snapshot of a mounted XFS through FUSE: taken with the file system frozen (LoopFreezer, xfs_freeze's
// ioctl), the image mounted next to the origin (`-o nouuid`: both carry the same UUID), pre-snapshot files
// byte-exact, later ones absent, the image's own writes surviving a remount without reaching the origin,
// and both clean under xfs_repair -n.
import assert from "node:assert/strict";
import { test } from "node:test";
import { checksums, EngineFixture, exists, MiB, writeFiles } from "./engine-fixture.js";
import { must, run } from "./fuse-fixture.js";

test("snapshot of a mounted XFS over FUSE: the image mounts with nouuid, holds the pre-snapshot files, keeps its own writes, xfs_repair -n clean", async (t) => {
  const fixture = await EngineFixture.create(t, ["mkfs.xfs", "xfs_repair", "sha256sum", "fsfreeze"]);
  if (!fixture) return;
  const { engine } = fixture;
  // mkfs.xfs refuses file systems below 300 MiB.
  await fixture.addDevice("xfs0", 320 * MiB);
  const origin = await fixture.attachLoop("xfs0");
  await must("mkfs.xfs", ["-q", "-f", origin]);
  const originFs = await fixture.mountFs(origin, "origin");
  const before = await writeFiles(originFs, "before-");

  const snapshot = await engine.createSnapshot({
    storage: fixture.directory,
    limitBytes: 512 * MiB,
    devices: ["xfs0"],
  });
  const taken = await engine.takeSnapshot(snapshot.id);
  assert.deepEqual(
    (taken.takeReport?.frozen ?? []).map((entry) => [entry.device, entry.fsType, entry.error]),
    [["xfs0", "xfs", null]],
    "the XFS was frozen around the take",
  );
  const after = await writeFiles(originFs, "after-");

  const image = await fixture.attachLoop(`xfs0@${snapshot.id}`);
  let imageFs = await fixture.mountFs(image, "image", ["-o", "nouuid"]);
  assert.equal(await checksums(imageFs, "before-"), before, "pre-snapshot files are in the image");
  assert.equal(await exists(`${imageFs}/after-1`), false, "post-snapshot files are not");
  const imageOnly = await writeFiles(imageFs, "image-");
  await fixture.unmountFs(imageFs);
  imageFs = await fixture.mountFs(image, "image", ["-o", "nouuid"]);
  assert.equal(await checksums(imageFs, "image-"), imageOnly, "the image's writes persist across a remount");
  assert.equal(await checksums(imageFs, "before-"), before);
  assert.equal(await exists(`${originFs}/image-1`), false, "the origin does not see the image's writes");
  assert.equal(await checksums(originFs, "after-"), after);
  assert.equal(await checksums(originFs, "before-"), before);

  await fixture.unmountFs(imageFs);
  await fixture.unmountFs(originFs);
  for (const device of [image, origin]) {
    const repair = await run("xfs_repair", ["-n", device]);
    assert.equal(repair.exitCode, 0, `xfs_repair -n ${device}:\n${repair.stdout}${repair.stderr}`);
  }
});

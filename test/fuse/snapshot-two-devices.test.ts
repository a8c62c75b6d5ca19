// One snapshot of two devices through FUSE: two ext4 origins (FileBackend files) mounted on loop devices,
// one take that freezes both, later writes on both origins, and both images mounted next to them with
// exactly the pre-snapshot files; every file system e2fsck clean at the end.
import assert from "node:assert/strict";
import { test } from "node:test";
import { checksums, EngineFixture, exists, MiB, writeFiles } from "./engine-fixture.js";
import { must, run } from "./fuse-fixture.js";

test("one snapshot of two mounted ext4 devices: both images hold exactly the pre-snapshot files, all four fsck clean", async (t) => {
  const fixture = await EngineFixture.create(t, ["mkfs.ext4", "e2fsck", "sha256sum", "fsfreeze"]);
  if (!fixture) return;
  const { engine } = fixture;
  const names = ["left", "right"] as const;
  const origins = new Map<string, { loop: string; fs: string; before: string }>();
  for (const name of names) {
    await fixture.addDevice(name, 96 * MiB);
    const loop = await fixture.attachLoop(name);
    await must("mkfs.ext4", ["-q", "-F", loop]);
    const fs = await fixture.mountFs(loop, `origin-${name}`);
    origins.set(name, { loop, fs, before: await writeFiles(fs, `before-${name}-`) });
  }
  await must("sync", []);

  const snapshot = await engine.createSnapshot({
    storage: fixture.directory,
    limitBytes: 256 * MiB,
    devices: [...names],
  });
  const taken = await engine.takeSnapshot(snapshot.id);
  assert.deepEqual(
    (taken.takeReport?.frozen ?? []).map((entry) => [entry.device, entry.error]).sort(),
    [
      ["left", null],
      ["right", null],
    ],
    "both file systems were frozen around the one take",
  );
  const later = new Map<string, string>();
  for (const name of names) later.set(name, await writeFiles(origins.get(name)!.fs, `after-${name}-`));

  const images: string[] = [];
  for (const name of names) {
    const origin = origins.get(name)!;
    const image = await fixture.attachLoop(`${name}@${snapshot.id}`);
    images.push(image);
    const imageFs = await fixture.mountFs(image, `image-${name}`);
    assert.equal(
      await checksums(imageFs, `before-${name}-`),
      origin.before,
      `${name}: the pre-snapshot files are in the image`,
    );
    assert.equal(await exists(`${imageFs}/after-${name}-1`), false, `${name}: later files are not`);
    assert.equal(await checksums(origin.fs, `after-${name}-`), later.get(name), `${name}: origin keeps them`);
    await fixture.unmountFs(imageFs);
  }
  for (const name of names) await fixture.unmountFs(origins.get(name)!.fs);

  for (const device of [...images, ...names.map((name) => origins.get(name)!.loop)]) {
    const fsck = await run("e2fsck", ["-fn", device]);
    assert.equal(fsck.exitCode, 0, `e2fsck -fn ${device}:\n${fsck.stdout}${fsck.stderr}`);
  }
  const info = engine.snapshotInfo(snapshot.id);
  assert.equal(info.state, "taken", "the snapshot is intact after the later writes");
  for (const device of info.devices) {
    assert.equal(device.error, null);
    assert.ok(device.chunksStored > 0, `${device.name}: the later writes were copied before writing`);
  }
});

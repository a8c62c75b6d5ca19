// Reads of a file-backed export through a loop device: they show the backing file's bytes at once, also
// bytes written around the FUSE face; they fail with EIO once the export vanishes, though the loop device
// still holds the file open; and after the last release nothing but the backend itself holds the backing
// file open (whatever path the FUSE face reads it by).
import assert from "node:assert/strict";
import { randomBytes } from "node:crypto";
import { readdir, readFile, readlink, writeFile } from "node:fs/promises";
import { join } from "node:path";
import { test } from "node:test";
import { boundedBy } from "./engine-fixture.js";
import { FuseFixture, must, run } from "./fuse-fixture.js";

const MiB = 1024 * 1024;

/** Descriptors of this process open on `path`. */
async function descriptorsOn(path: string): Promise<number> {
  let count = 0;
  for (const fd of await readdir("/proc/self/fd")) {
    const target = await readlink(`/proc/self/fd/${fd}`).catch(() => "");
    if (target === path) count += 1;
  }
  return count;
}

test("a file export read through a loop device: fresh bytes at once, EIO after it vanishes, no descriptor left behind", async (t) => {
  const fixture = await FuseFixture.create(t, ["dd", "cmp", "stat"]);
  if (!fixture) return;
  const sizeBytes = 4 * MiB;
  const backend = fixture.addFileExport("disk0", sizeBytes);
  const backingPath = join(fixture.directory, "disk0.img");
  const initial = randomBytes(sizeBytes);
  await backend.write(0, initial);
  const loop = await fixture.attachLoop("disk0", true);
  const expectedPath = join(fixture.directory, "expected.bin");
  const sameAsExpected = async () =>
    run("sh", ["-c", 'dd if="$1" bs=64k iflag=direct status=none | cmp - "$2"', "cmp", loop, expectedPath]);

  await writeFile(expectedPath, initial);
  const first = await sameAsExpected();
  assert.equal(first.exitCode, 0, `the loop device reads the backing file: ${first.stdout}${first.stderr}`);
  // Bytes written around the FUSE face (straight into the backend) are read at once: nothing caches them.
  const patch = randomBytes(3 * 4096 + 100);
  await backend.write(MiB + 512, patch);
  const updated = Buffer.from(initial);
  updated.set(patch, MiB + 512);
  await writeFile(expectedPath, updated);
  const second = await sameAsExpected();
  assert.equal(second.exitCode, 0, `the new bytes are read at once: ${second.stdout}${second.stderr}`);

  fixture.source.remove("disk0");
  const gone = await run("dd", [
    `if=${loop}`,
    "of=/dev/null",
    "bs=4k",
    "count=1",
    "iflag=direct",
    "status=none",
  ]);
  assert.notEqual(gone.exitCode, 0, "a read of a vanished export fails");
  assert.match(gone.stderr, /Input\/output error/);

  await fixture.detachLoop(loop);
  // Every request lets the FUSE face finish what the release left pending; poll with requests until only
  // the backend's own descriptor is left (a hang here is the failure).
  await boundedBy(
    (async () => {
      while ((await descriptorsOn(backingPath)) > 1) {
        await must("stat", [fixture.mountDir]);
        await new Promise((resolve) => setTimeout(resolve, 20));
      }
    })(),
    10_000,
    "releasing every descriptor of the backing file",
  );
  assert.equal(await descriptorsOn(backingPath), 1, "only the backend holds the backing file");
  assert.ok((await readFile(backingPath)).equals(updated), "the backing file is intact");
});

// Block I/O into a snapshot image through its FUSE file and a loop device: unaligned 1 MiB direct writes
// that straddle 256 KiB chunk borders, into chunks the origin has already preserved and chunks it has
// not, read back exactly; the image as a whole equals the pre-snapshot bytes plus those writes; the origin
// is untouched by them (its checksum before and after, and its backing file against a model).
import assert from "node:assert/strict";
import { createHash, randomBytes } from "node:crypto";
import { readFile, writeFile } from "node:fs/promises";
import { join } from "node:path";
import { test } from "node:test";
import { directChecksum, EngineFixture, MiB } from "./engine-fixture.js";
import { directWriteThenRead, must } from "./fuse-fixture.js";

const KiB = 1024;

function sha256(data: Uint8Array): string {
  return createHash("sha256").update(data).digest("hex");
}

test("unaligned 1 MiB direct writes at 126, 2174 and 4222 KiB into an image's loop device read back exactly; the origin is unchanged", async (t) => {
  const fixture = await EngineFixture.create(t, ["dd", "sha256sum"]);
  if (!fixture) return;
  const { engine } = fixture;
  const sizeBytes = 8 * MiB;
  await fixture.addDevice("disk0", sizeBytes);
  const origin = await fixture.attachLoop("disk0");
  const initial = randomBytes(sizeBytes);
  const initialPath = join(fixture.directory, "initial.bin");
  await writeFile(initialPath, initial);
  await must("dd", [`if=${initialPath}`, `of=${origin}`, "bs=1M", "oflag=direct", "status=none"]);

  const snapshot = await engine.createSnapshot({
    storage: "memory:",
    limitBytes: 32 * MiB,
    chunkSizeBytes: 256 * KiB,
    devices: ["disk0"],
  });
  await engine.takeSnapshot(snapshot.id, { noFreeze: true });
  // The origin overwrites 2048-2560 KiB after the take: chunks 8 and 9 are preserved before the image's
  // write at 2174 KiB lands on them; that write's chunks 10-12, and the other writes' chunks, are not.
  const originModel = Buffer.from(initial);
  const originWrite = randomBytes(512 * KiB);
  const originWritePath = join(fixture.directory, "origin-write.bin");
  await writeFile(originWritePath, originWrite);
  await must("dd", [
    `if=${originWritePath}`,
    `of=${origin}`,
    "bs=512k",
    `seek=${2048 * KiB}`,
    "oflag=direct,seek_bytes",
    "status=none",
  ]);
  originModel.set(originWrite, 2048 * KiB);
  const originBefore = await directChecksum(origin);
  assert.equal(originBefore, sha256(originModel), "the origin holds its own write before the image writes");
  const storedBefore = engine.snapshotInfo(snapshot.id).devices[0]?.chunksStored ?? 0;
  assert.equal(storedBefore, 2, "the origin's write preserved exactly chunks 8 and 9");

  const image = await fixture.attachLoop(`disk0@${snapshot.id}`);
  const imageModel = Buffer.from(initial);
  for (const offsetBytes of [126 * KiB, 2174 * KiB, 4222 * KiB]) {
    const data = randomBytes(MiB);
    const readBack = await directWriteThenRead(image, offsetBytes, data, fixture.directory);
    imageModel.set(data, offsetBytes);
    assert.ok(readBack.equals(data), `the image write at ${offsetBytes} reads back`);
  }

  const whole = join(fixture.directory, "image-whole.bin");
  await must("dd", [`if=${image}`, `of=${whole}`, "bs=1M", "iflag=direct", "status=none"]);
  assert.ok(
    (await readFile(whole)).equals(imageModel),
    "the image is the pre-snapshot bytes plus its own writes, neighbours untouched",
  );
  assert.equal(await directChecksum(origin), originBefore, "the image writes did not reach the origin");
  assert.ok(
    (await readFile(fixture.backendPath("disk0"))).equals(originModel),
    "the origin's backing file holds exactly its own bytes",
  );
});

// Block I/O through a blocksnap FUSE file, checked with dd, fio (libaio, crc32c verify) and cmp against
// the device's own bytes: unaligned large writes through a loop device, and many parallel readers and
// writers through the loop device and the FUSE file at once. The same bytes through the NBD face, and the
// same checks on a snapshot image: cross-face.test.ts and image-block-io.test.ts.
import assert from "node:assert/strict";
import { randomBytes } from "node:crypto";
import { readFile, writeFile } from "node:fs/promises";
import { join } from "node:path";
import { test } from "node:test";
import { directWriteThenRead, FuseFixture, must, run } from "./fuse-fixture.js";

const KiB = 1024;
const MiB = 1024 * KiB;

test("unaligned 1 MiB direct writes at 126 KiB, 2174 KiB and 4222 KiB through a loop device read back exactly", async (t) => {
  const fixture = await FuseFixture.create(t, ["dd"]);
  if (!fixture) return;
  const sizeBytes = 8 * MiB;
  const backend = fixture.addMemoryExport("disk0", sizeBytes);
  const model = randomBytes(sizeBytes);
  await backend.write(0, model);
  const loop = await fixture.attachLoop("disk0");
  for (const offsetBytes of [126 * KiB, 2174 * KiB, 4222 * KiB]) {
    const data = randomBytes(MiB);
    const readBack = await directWriteThenRead(loop, offsetBytes, data, fixture.directory);
    model.set(data, offsetBytes);
    assert.ok(readBack.equals(data), `the write at ${offsetBytes} reads back through the loop`);
  }

  // Neighbours untouched, writes where they belong: the whole device against the model, two ways.
  const whole = join(fixture.directory, "whole.bin");
  await must("dd", [`if=${loop}`, `of=${whole}`, "bs=1M", "iflag=direct", "status=none"]);
  assert.ok((await readFile(whole)).equals(model), "the loop device holds exactly the model");
  const direct = new Uint8Array(sizeBytes);
  await backend.read(0, direct);
  assert.ok(Buffer.from(direct).equals(model), "the backing device holds exactly the model");
});

test("parallel readers and writers through the loop device and the FUSE file see the backing file's bytes", async (t) => {
  const fixture = await FuseFixture.create(t, ["dd", "cmp", "fio"]);
  if (!fixture) return;
  // 0-64 MiB: fio randrw with crc32c verify, 4 jobs on the loop device; 64-80 MiB: stable, read back by
  // parallel readers through the FUSE file; 80-96 MiB: parallel dd writers straight into the FUSE file.
  const sizeBytes = 96 * MiB;
  const backend = fixture.addFileExport("disk0", sizeBytes);
  const initial = randomBytes(sizeBytes);
  await backend.write(0, initial);
  const stable = join(fixture.directory, "stable.bin");
  await writeFile(stable, initial.subarray(64 * MiB, 80 * MiB));
  const loop = await fixture.attachLoop("disk0");
  const file = fixture.filePath("disk0");

  const fio = run("fio", [
    "--name=mix",
    `--filename=${loop}`,
    "--ioengine=libaio",
    "--direct=1",
    "--rw=randrw",
    "--bsrange=4k-256k",
    "--iodepth=16",
    "--numjobs=4",
    "--size=16M",
    "--offset_increment=16M",
    "--verify=crc32c",
    "--do_verify=1",
    "--verify_state_save=0",
    "--output-format=terse",
  ]);
  const readers = Array.from({ length: 4 }, (_, index) =>
    run("sh", [
      "-c",
      'for pass in 1 2 3; do dd if="$1" bs=1M skip=64 count=16 iflag=direct status=none | cmp - "$2" || exit 1; done',
      `reader-${index}`,
      file,
      stable,
    ]),
  );
  const writes = Array.from({ length: 4 }, (_, index) => ({
    data: randomBytes(4 * MiB),
    at: 80 * MiB + index * 4 * MiB,
  }));
  const writers = writes.map(async ({ data, at }, index) => {
    const source = join(fixture.directory, `writer-${index}.bin`);
    await writeFile(source, data);
    return run("dd", [
      `if=${source}`,
      `of=${file}`,
      "bs=256k",
      `seek=${at}`,
      "oflag=direct,seek_bytes",
      "conv=notrunc",
      "status=none",
    ]);
  });
  const fioResult = await fio;
  assert.equal(fioResult.exitCode, 0, `fio verify failed: ${fioResult.stderr}${fioResult.stdout}`);
  for (const result of await Promise.all(readers)) {
    assert.equal(result.exitCode, 0, `a reader saw other bytes than the backing file: ${result.stderr}`);
  }
  for (const result of await Promise.all(writers)) assert.equal(result.exitCode, 0, result.stderr);

  // What every path shows now equals a direct read of the backing file.
  const backingPath = join(fixture.directory, "disk0.img");
  const viaLoop = await run("sh", [
    "-c",
    'dd if="$1" bs=1M iflag=direct status=none | cmp - "$2"',
    "cmp",
    loop,
    backingPath,
  ]);
  assert.equal(
    viaLoop.exitCode,
    0,
    `loop device differs from the backing file: ${viaLoop.stdout}${viaLoop.stderr}`,
  );
  const viaFile = await run("sh", [
    "-c",
    'dd if="$1" bs=1M iflag=direct status=none | cmp - "$2"',
    "cmp",
    file,
    backingPath,
  ]);
  assert.equal(
    viaFile.exitCode,
    0,
    `FUSE file differs from the backing file: ${viaFile.stdout}${viaFile.stderr}`,
  );
  for (const { data, at } of writes) {
    const target = new Uint8Array(data.byteLength);
    await backend.read(at, target);
    assert.ok(Buffer.from(target).equals(data), `the direct write at ${at} reached the device`);
  }
});

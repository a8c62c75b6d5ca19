import assert from "node:assert/strict";
import { execFile } from "node:child_process";
import { mkdtempSync, rmSync, statSync, writeFileSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { after, test } from "node:test";
import { BlockError } from "../block/errors.js";
import { blockDeviceSizeBytes, FileBackend } from "./file-backend.js";

const directory = mkdtempSync(join(tmpdir(), "blocksnap-file-backend-"));
after(() => rmSync(directory, { recursive: true, force: true }));

test("FileBackend creates a file of the given size and round-trips data", async () => {
  const path = join(directory, "disk0.img");
  const backend = FileBackend.open(path, { sizeBytes: 1 << 20 });
  assert.equal(backend.sizeBytes, 1 << 20);
  assert.equal(statSync(path).size, 1 << 20);
  await backend.write(4096, new Uint8Array([1, 2, 3]), { fua: true });
  await backend.writeZeroes(4097, 1);
  const target = new Uint8Array(4);
  await backend.read(4095, target);
  assert.deepEqual([...target], [0, 1, 0, 3]);
  await backend.flush();
  await backend.close();
  await assert.rejects(
    backend.read(0, new Uint8Array(1)),
    (e: unknown) => e instanceof BlockError && e.errno === "EIO",
  );
});

test("FileBackend uses an existing file at its size and refuses what is not a file or block device", async () => {
  const path = join(directory, "existing.img");
  writeFileSync(path, new Uint8Array(8192).fill(5));
  const backend = FileBackend.open(path);
  assert.equal(backend.sizeBytes, 8192);
  await backend.close();
  assert.throws(
    () => FileBackend.open(directory),
    (e: unknown) => e instanceof BlockError && e.errno === "EINVAL",
  );
  assert.throws(
    () => FileBackend.open(join(directory, "absent.img")),
    (e: unknown) => e instanceof BlockError && e.errno === "ENOENT",
  );
});

test("FileBackend opens a block device exclusively, sized from sysfs", async (t) => {
  if (process.getuid?.() !== 0) return t.skip("needs root for losetup");
  const backing = join(directory, "loop-backing.img");
  writeFileSync(backing, new Uint8Array(8 * 1024 * 1024));
  const loop = await new Promise<string>((resolve, reject) =>
    execFile("losetup", ["-f", "--show", backing], (error, stdout) =>
      error ? reject(error) : resolve(stdout.trim()),
    ),
  ).catch((error: unknown) => String(error));
  if (!loop.startsWith("/dev/")) return t.skip(`losetup failed: ${loop}`);
  try {
    const backend = FileBackend.open(loop);
    assert.equal(backend.kind, "block-device");
    assert.equal(backend.sizeBytes, 8 * 1024 * 1024);
    assert.equal(blockDeviceSizeBytes(loop), 8 * 1024 * 1024);
    assert.throws(
      () => FileBackend.open(loop),
      (e: unknown) => e instanceof BlockError && e.errno === "EBUSY",
    );
    assert.throws(
      () => FileBackend.open(loop, { sizeBytes: 4096 }),
      (e: unknown) => e instanceof BlockError && e.errno === "EINVAL",
    );
    await backend.write(8 * 1024 * 1024 - 4096, new Uint8Array(4096).fill(0x5c), { fua: true });
    const target = new Uint8Array(4096);
    await backend.read(8 * 1024 * 1024 - 4096, target);
    assert.ok(target.every((byte) => byte === 0x5c));
    await backend.close();
  } finally {
    await new Promise((resolve) => execFile("losetup", ["-d", loop], resolve));
  }
});

import assert from "node:assert/strict";
import { linkSync, mkdtempSync, rmSync, symlinkSync, writeFileSync } from "node:fs";
import { stat } from "node:fs/promises";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { test } from "node:test";
import { collide, type FileIdentity, identityOf, majorMinorOf } from "./file-identity.js";

test("majorMinorOf decodes glibc's dev_t, small and large numbers", () => {
  assert.equal(majorMinorOf(0x0703n), "7:3");
  assert.equal(majorMinorOf(52n), "0:52");
  // major 259 (blkext), minor 300: bits spread over both halves of the encoding.
  const major = 259n;
  const minor = 300n;
  const dev =
    ((major & 0xfffn) << 8n) | ((major & ~0xfffn) << 32n) | (minor & 0xffn) | ((minor & ~0xffn) << 12n);
  assert.equal(majorMinorOf(dev), "259:300");
});

test("a hard link and a symlink have the identity of the file; another file does not", async () => {
  const directory = mkdtempSync(join(tmpdir(), "blocksnap-identity-"));
  try {
    const file = join(directory, "a");
    writeFileSync(file, "a");
    linkSync(file, join(directory, "hard"));
    symlinkSync(file, join(directory, "soft"));
    writeFileSync(join(directory, "other"), "b");
    const identity = async (name: string) =>
      (await identityOf(await stat(join(directory, name), { bigint: true })))!;
    const original = await identity("a");
    assert.ok(collide(original, await identity("hard")));
    assert.ok(collide(original, await identity("soft")));
    assert.ok(!collide(original, await identity("other")));
    assert.equal(
      await identityOf(await stat(directory, { bigint: true })),
      null,
      "a directory has no identity",
    );
  } finally {
    rmSync(directory, { recursive: true, force: true });
  }
});

test("extents collide only where their byte ranges overlap", () => {
  const range = (self: string, startBytes: number, endBytes: number): FileIdentity => ({
    kind: "block-device",
    self,
    deviceNumber: null,
    extents: [{ key: "block:8:0", fileSystem: null, startBytes, endBytes }],
  });
  const whole = range("block:8:0", 0, Number.POSITIVE_INFINITY);
  const first = range("block:8:1", 1 << 20, 2 << 20);
  const second = range("block:8:2", 2 << 20, 3 << 20);
  assert.ok(collide(whole, first), "a disk and its partition");
  assert.ok(!collide(first, second), "two partitions side by side");
  assert.ok(collide(first, range("block:7:0", (2 << 20) - 1, 5 << 20)), "one shared byte is enough");
});

import assert from "node:assert/strict";
import { mkdtempSync, rmSync, statSync, writeFileSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { after, test } from "node:test";
import { BlockError } from "../block/errors.js";
import { FileBackend } from "./file-backend.js";

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

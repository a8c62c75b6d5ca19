import assert from "node:assert/strict";
import { randomBytes } from "node:crypto";
import { mkdtemp, readdir, readFile, rm, writeFile } from "node:fs/promises";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { after, before, test } from "node:test";
import { BlockError } from "../block/errors.js";
import { ChunkCodec } from "./chunk-codec.js";
import { DirectoryStore } from "./directory-store.js";
import { imageDigestOf, type Manifest } from "./manifest.js";
import { Repository } from "./repository.js";
import { createKeyFile, readKeyFile } from "./repository-key.js";
import { restoreToFile } from "./restore.js";

let directory = "";
before(async () => {
  directory = await mkdtemp(join(tmpdir(), "blocksnap-repo-"));
});
after(async () => {
  await rm(directory, { recursive: true, force: true });
});

function isErrno(errno: string, pattern: RegExp) {
  return (error: unknown) =>
    error instanceof BlockError && error.errno === errno && pattern.test(error.message);
}

/** Half text (compressible), half random. */
function sampleChunk(lengthBytes: number): Buffer {
  const text = Buffer.from("blocksnap backup ".repeat(Math.ceil(lengthBytes / 34))).subarray(
    0,
    lengthBytes / 2,
  );
  return Buffer.concat([text, randomBytes(lengthBytes - text.length)]);
}

void test("ChunkCodec round-trips plain and encrypted chunks and names each failure", async () => {
  const keyPath = join(directory, "codec.key");
  await createKeyFile(keyPath);
  const key = await readKeyFile(keyPath);
  const plain = sampleChunk(1 << 20);
  for (const codec of [new ChunkCodec(null, 1 << 22), new ChunkCodec(key, 1 << 22)]) {
    const stored = codec.encode(plain);
    assert.ok(stored.length < plain.length, "the text half compresses");
    const id = codec.idOf(plain);
    assert.deepEqual(Buffer.from(codec.decode(stored, "c", id)), plain);
    const flipped = Buffer.from(stored);
    flipped[flipped.length - 100] = (flipped[flipped.length - 100] ?? 0) ^ 1;
    assert.throws(() => codec.decode(flipped, "c", id), isErrno("EIO", /CRC/));
  }
  assert.notEqual(
    new ChunkCodec(null, 1 << 22).idOf(plain),
    new ChunkCodec(key, 1 << 22).idOf(plain),
    "keyed ids",
  );
  const otherPath = join(directory, "other.key");
  await createKeyFile(otherPath);
  const other = new ChunkCodec(await readKeyFile(otherPath), 1 << 22);
  const stored = new ChunkCodec(key, 1 << 22).encode(plain);
  assert.throws(() => other.decode(stored, "c", null), isErrno("EACCES", /does not decrypt/));
  await assert.rejects(createKeyFile(keyPath), isErrno("EEXIST", /not overwritten/));
});

void test("Repository: chunks dedup, manifests round-trip, the codec runs in workers", async () => {
  const store = new DirectoryStore(join(directory, "plain"));
  const repository = await Repository.init(store, { chunkSizeBytes: 1 << 20 });
  try {
    const chunk = sampleChunk(1 << 20);
    const first = await repository.codec.encode(chunk);
    assert.ok(first.stored !== null);
    assert.equal(await repository.hasChunk(first.id), false);
    await repository.putChunk(first.id, first.stored);
    assert.equal(await repository.hasChunk(first.id), true);
    const zero = await repository.codec.encode(new Uint8Array(1 << 20));
    assert.equal(zero.stored, null, "an all-zero chunk is stored as nothing");
    assert.deepEqual(Buffer.from(await repository.readChunk(first.id)), chunk);
    const chunks = [first.id, null, first.id];
    const manifest: Manifest = {
      format: "blocksnap-backup-manifest",
      version: 1,
      id: repository.newBackupId(),
      device: "disk0",
      sizeBytes: 3 << 20,
      chunkSizeBytes: 1 << 20,
      level: "full",
      parentId: null,
      cbt: { generationId: "g", changesNumber: 1, blockSizeBytes: 65536 },
      snapshotId: null,
      startedAt: new Date().toISOString(),
      finishedAt: new Date().toISOString(),
      durationMs: 1,
      readBytes: 3 << 20,
      newChunks: 1,
      newBytesStored: first.stored.length,
      imageDigest: imageDigestOf(chunks, () => zero.id),
      chunks,
    };
    await repository.writeManifest(manifest);
    const refs = await repository.listManifests();
    assert.deepEqual(
      refs.map((ref) => `${ref.device}/${ref.id}`),
      [`disk0/${manifest.id}`],
    );
    assert.deepEqual(await repository.readManifest(await repository.resolve("disk0/latest")), manifest);
    // Backups finished within one second (small devices, fast machines) still resolve in order.
    const ids = Array.from({ length: 50 }, () => repository.newBackupId());
    assert.deepEqual([...ids].sort(), ids, "ids sort in the order they were made");
    assert.match(ids[0] ?? "", /^\d{8}T\d{9}Z-[0-9a-f]{6}$/);
    const chunkFiles = [];
    for await (const listed of repository.listChunks()) chunkFiles.push(listed.id);
    assert.deepEqual(chunkFiles, [first.id], "one chunk object for two references");
    const temporaries = (await readdir(join(directory, "plain", "manifests", "disk0"))).filter((name) =>
      name.startsWith("."),
    );
    assert.deepEqual(temporaries, [], "no temporary file left by an atomic put");

    const restored = join(directory, "restored.img");
    await restoreToFile(repository, manifest, restored);
    assert.deepEqual(await readFile(restored), Buffer.concat([chunk, Buffer.alloc(1 << 20), chunk]));
    // Chunks that each check against their ids, in an order the image digest does not allow.
    const reordered: Manifest = { ...manifest, chunks: [first.id, first.id, null] };
    const untouched = join(directory, "untouched.img");
    await assert.rejects(
      restoreToFile(repository, reordered, untouched),
      isErrno("EIO", /image digest does not match its chunk list/),
    );
    await assert.rejects(readFile(untouched), /ENOENT/, "nothing is written");
  } finally {
    await repository.close();
  }
});

void test("Repository.open: missing, foreign, newer, encrypted without or with a wrong key: one clear error each", async () => {
  const missing = new DirectoryStore(join(directory, "absent"));
  await assert.rejects(Repository.open(missing), isErrno("ENOENT", /not a blocksnap backup repository/));
  const foreignPath = join(directory, "foreign");
  await Repository.init(new DirectoryStore(foreignPath)).then((repository) => repository.close());
  await writeFile(join(foreignPath, "config"), JSON.stringify({ format: "restic", version: 2 }));
  await assert.rejects(Repository.open(new DirectoryStore(foreignPath)), isErrno("EINVAL", /foreign format/));
  const config = JSON.parse(await readFile(join(directory, "plain", "config"), "utf8"));
  await writeFile(join(foreignPath, "config"), JSON.stringify({ ...config, version: 99 }));
  await assert.rejects(
    Repository.open(new DirectoryStore(foreignPath)),
    isErrno("ENOTSUP", /format version 99/),
  );

  const keyPath = join(directory, "repo.key");
  const wrongPath = join(directory, "wrong.key");
  await createKeyFile(keyPath);
  await createKeyFile(wrongPath);
  const encryptedStore = new DirectoryStore(join(directory, "encrypted"));
  const repository = await Repository.init(encryptedStore, { key: await readKeyFile(keyPath) });
  const { id, stored } = await repository.codec.encode(sampleChunk(1 << 16));
  assert.ok(stored !== null);
  await repository.putChunk(id, stored);
  await repository.close();
  await assert.rejects(Repository.open(encryptedStore), isErrno("EACCES", /is encrypted/));
  await assert.rejects(
    Repository.open(encryptedStore, { key: await readKeyFile(wrongPath) }),
    isErrno("EACCES", /Wrong key/),
  );
  const reopened = await Repository.open(encryptedStore, { key: await readKeyFile(keyPath) });
  try {
    assert.equal((await reopened.readChunk(id)).length, 1 << 16);
    await assert.rejects(reopened.readChunk("0".repeat(64)), isErrno("EIO", /missing/));
  } finally {
    await reopened.close();
  }
  await assert.rejects(Repository.init(encryptedStore), isErrno("EEXIST", /already holds/));
});

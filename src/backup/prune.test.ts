import assert from "node:assert/strict";
import { randomBytes } from "node:crypto";
import { mkdtemp, rm } from "node:fs/promises";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { after, before, test } from "node:test";
import { DirectoryStore } from "./directory-store.js";
import { imageDigestOf, type Manifest } from "./manifest.js";
import { collectGarbage, keptIds, pruneBackups } from "./prune.js";
import { Repository } from "./repository.js";
import { verifyBackups } from "./restore.js";

let directory = "";
before(async () => {
  directory = await mkdtemp(join(tmpdir(), "blocksnap-prune-"));
});
after(async () => {
  await rm(directory, { recursive: true, force: true });
});

const chunkSizeBytes = 64 << 10;

async function storeChunk(repository: Repository): Promise<string> {
  const encoded = await repository.codec.encode(randomBytes(chunkSizeBytes));
  assert.ok(encoded.stored !== null);
  await repository.putChunk(encoded.id, encoded.stored);
  return encoded.id;
}

async function writeBackup(repository: Repository, device: string, chunks: string[]): Promise<string> {
  const zero = await repository.codec.encode(new Uint8Array(chunkSizeBytes));
  const manifest: Manifest = {
    format: "blocksnap-backup-manifest",
    version: 1,
    id: repository.newBackupId(),
    device,
    sizeBytes: chunks.length * chunkSizeBytes,
    chunkSizeBytes,
    level: "full",
    parentId: null,
    cbt: null,
    snapshotId: null,
    startedAt: new Date().toISOString(),
    finishedAt: new Date().toISOString(),
    durationMs: 1,
    readBytes: chunks.length * chunkSizeBytes,
    newChunks: chunks.length,
    newBytesStored: 0,
    imageDigest: imageDigestOf(chunks, () => zero.id),
    chunks,
  };
  await repository.writeManifest(manifest);
  return `${device}/${manifest.id}`;
}

async function chunkIds(repository: Repository): Promise<Set<string>> {
  const ids = new Set<string>();
  for await (const chunk of repository.listChunks()) ids.add(chunk.id);
  return ids;
}

void test("prune keeps the newest N per device; GC removes only unreferenced chunks past the grace", async () => {
  const repository = await Repository.init(new DirectoryStore(join(directory, "repo")), { chunkSizeBytes });
  try {
    const shared = await storeChunk(repository);
    const onlyOld = await storeChunk(repository);
    const onlyNew = await storeChunk(repository);
    const other = await storeChunk(repository);
    const orphanFresh = await storeChunk(repository);
    const oldBackup = await writeBackup(repository, "disk0", [shared, onlyOld]);
    // ids carry the second; the next backup of the same device must sort after the first
    await new Promise((resolve) => setTimeout(resolve, 1100));
    const newBackup = await writeBackup(repository, "disk0", [shared, onlyNew]);
    const otherBackup = await writeBackup(repository, "disk1", [other, shared]);

    const dry = await pruneBackups(repository, { keepLast: 1, dryRun: true });
    assert.deepEqual(dry.removed, [oldBackup]);
    assert.equal((await repository.listManifests()).length, 3, "a dry run deletes nothing");

    const pruned = await pruneBackups(repository, { keepLast: 1 });
    assert.deepEqual(pruned.removed, [oldBackup]);
    assert.deepEqual(pruned.kept.sort(), [newBackup, otherBackup].sort());

    const inGrace = await collectGarbage(repository);
    assert.equal(inGrace.removedChunks, 0, "fresh chunks stay within the grace period");
    assert.equal(inGrace.keptInGrace, 2);

    const collected = await collectGarbage(repository, { graceMs: 0, nowMs: Date.now() + 1000 });
    assert.equal(collected.removedChunks, 2);
    assert.ok(collected.removedBytes > 0);
    const left = await chunkIds(repository);
    assert.deepEqual([...left].sort(), [shared, onlyNew, other].sort());
    assert.equal(left.has(onlyOld) || left.has(orphanFresh), false);
    for (const ref of await repository.listManifests()) {
      const manifest = await repository.readManifest(ref);
      for (const id of manifest.chunks) if (id !== null) assert.ok(left.has(id), `${id} still there`);
    }
  } finally {
    await repository.close();
  }
});

test("keep-daily and keep-weekly keep the newest backup of each recent day and ISO week (UTC)", () => {
  // Oldest first, as listManifests gives them.
  const ids = [
    "no-time-in-this-id",
    "20261116T230000Z-a1", // Mon, week 47
    "20261122T100000Z-a2", // Sun, week 47 (newest of week 47)
    "20261123T010000Z-a3", // Mon, week 48
    "20261201T080000Z-a4", // Tue, week 49
    "20261201T200000Z-a5", // Tue, week 49 (newest of its day)
    "20261203T090000123Z-a6", // Thu (an id to the millisecond)
    "20261204T030000Z-a7", // Fri (newest)
  ];
  const refs = ids.map((id) => ({ id }));
  const sorted = (kept: Set<string>) => [...kept].sort();
  assert.deepEqual(sorted(keptIds(refs, { keepLast: 1 })), ["20261204T030000Z-a7", "no-time-in-this-id"]);
  assert.deepEqual(sorted(keptIds(refs, { keepLast: 1, keepDaily: 3 })), [
    "20261201T200000Z-a5",
    "20261203T090000123Z-a6",
    "20261204T030000Z-a7",
    "no-time-in-this-id",
  ]);
  assert.deepEqual(sorted(keptIds(refs, { keepLast: 1, keepWeekly: 2 })), [
    "20261123T010000Z-a3",
    "20261204T030000Z-a7",
    "no-time-in-this-id",
  ]);
  assert.deepEqual(sorted(keptIds(refs, { keepLast: 1, keepWeekly: 4 })), [
    "20261122T100000Z-a2",
    "20261123T010000Z-a3",
    "20261204T030000Z-a7",
    "no-time-in-this-id",
  ]);
});

void test("verify --fast finds a deleted chunk without downloading; only the full verify finds a damaged one", async () => {
  const repository = await Repository.init(new DirectoryStore(join(directory, "repo-verify")), {
    chunkSizeBytes,
  });
  try {
    const kept = await storeChunk(repository);
    const deleted = await storeChunk(repository);
    const damaged = await storeChunk(repository);
    await writeBackup(repository, "disk0", [kept, deleted, damaged]);
    const manifests = [];
    for (const ref of await repository.listManifests()) manifests.push(await repository.readManifest(ref));
    assert.deepEqual(await verifyBackups(repository, manifests, { fast: true }), []);
    await repository.deleteChunk(deleted);
    const stored = await repository.store.get(Repository.chunkKey(damaged));
    stored[stored.length - 1] = (stored[stored.length - 1] ?? 0) ^ 0xff;
    await repository.store.put(Repository.chunkKey(damaged), stored);
    const fast = await verifyBackups(repository, manifests, { fast: true });
    assert.deepEqual(
      fast.map((problem) => problem.problem),
      [`at offset ${chunkSizeBytes}: chunk ${deleted} is missing`],
    );
    const full = await verifyBackups(repository, manifests);
    assert.equal(full.length, 2, JSON.stringify(full));
    assert.deepEqual(
      full.map((problem) => problem.offsetsBytes),
      [[chunkSizeBytes], [2 * chunkSizeBytes]],
      "each problem names where in the image the bad chunk is used",
    );
  } finally {
    await repository.close();
  }
});

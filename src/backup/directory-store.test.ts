/**
 * DirectoryStore's batched puts: an object put with putPending is invisible (a temporary file) until its
 * batch is synced, then appears whole; a full batch syncs by itself; nothing temporary is left behind.
 */
import assert from "node:assert/strict";
import { mkdtemp, readdir, rm } from "node:fs/promises";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { test } from "node:test";
import { DirectoryStore } from "./directory-store.js";

void test("putPending objects appear only after syncPending (or a full batch), with their bytes", async () => {
  const directory = await mkdtemp(join(tmpdir(), "blocksnap-dirstore-"));
  try {
    const store = new DirectoryStore(directory);
    await store.putPending("chunks/ab/one", Buffer.from("first object"));
    assert.equal(await store.head("chunks/ab/one"), null, "invisible before the sync");
    assert.ok((await readdir(join(directory, "chunks/ab"))).some((name) => name.startsWith(".tmp-")));
    await store.syncPending();
    assert.equal(Buffer.from(await store.get("chunks/ab/one")).toString(), "first object");
    // 64 objects fill a batch: the 64th put syncs them all without a syncPending.
    for (let index = 0; index < 64; index++)
      await store.putPending(`chunks/c${index % 4}/n${index}`, Buffer.from(`object ${index}`));
    for (let index = 0; index < 64; index++)
      assert.equal(
        Buffer.from(await store.get(`chunks/c${index % 4}/n${index}`)).toString(),
        `object ${index}`,
      );
    await store.syncPending();
    for (const sub of ["ab", "c0", "c1", "c2", "c3"]) {
      const names = await readdir(join(directory, "chunks", sub));
      assert.deepEqual(
        names.filter((name) => name.startsWith(".")),
        [],
        `no temporary file left in chunks/${sub}`,
      );
    }
  } finally {
    await rm(directory, { recursive: true, force: true });
  }
});

import assert from "node:assert/strict";
import { mkdtempSync, readFileSync, rmSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { after, test } from "node:test";
import { NodePersistFile } from "./persist-file.js";
import { decodeJournal, RegionJournal } from "./region-journal.js";

const directory = mkdtempSync(join(tmpdir(), "blocksnap-region-journal-"));
after(() => rmSync(directory, { recursive: true, force: true }));

const header = {
  generationId: "g1",
  generationReason: "test",
  generationStartedAtMs: 1,
  snapNumberActive: 2,
  snapNumberPrevious: 1,
  blockSizeBytes: 65536,
  deviceSizeBytes: 64 << 20,
  regionBlocks: 16,
  backendIdentity: {},
  bootId: "b",
  checkpointGenerationId: null,
};

test("a new journal over a clean stop's file goes on above its sequence: a crash then finds the new, dirty header", async () => {
  const path = join(directory, "d0.journal");
  const first = await RegionJournal.start(await NodePersistFile.open(path), header, null, () => {});
  // A few header writes, then a clean stop: the old file's newest header says clean, at some sequence.
  await first.afterTake({ ...header, snapNumberActive: 3, snapNumberPrevious: 2 });
  await first.afterTake({ ...header, snapNumberActive: 4, snapNumberPrevious: 3 });
  await first.checkpointDone(first.checkpointBegin(), { clean: true });
  await first.close();
  const stopped = decodeJournal(new Uint8Array(readFileSync(path)));
  assert.equal(stopped.header.clean, true);

  // The next start (a clean stop's journal is not carried over) writes one header, then the daemon dies.
  const second = await RegionJournal.start(await NodePersistFile.open(path), header, null, () => {});
  await second.beforeWrite(0, 4096);
  const crashed = decodeJournal(new Uint8Array(readFileSync(path)));
  assert.ok(crashed.sequence > stopped.sequence, `${crashed.sequence} > ${stopped.sequence}`);
  assert.equal(crashed.header.clean, false, "recovery must see the running journal, not the old clean one");
  assert.equal(crashed.dirty[0], 1);
  await second.close();
});

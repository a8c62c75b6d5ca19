/**
 * Crash consistency of CBT persistence (CrashMonkey/ALICE style): a seeded random workload of origin
 * writes, takes and checkpoints runs against the real RegionJournal, CbtMap and recovery code, with the
 * journal's file replaced by a recorder of every write and fdatasync. At random moments the harness builds
 * the states a crash could leave — everything up to the last fdatasync, plus a random subset of the later
 * writes, some of them torn — and recovers from each (recoverAfterCrash, what the daemon runs at start).
 * Every recovery must report every block whose write reached the backend (passed the journal) with a
 * number at least as high as the exact map would, in the same generation. Replay: BLOCKSNAP_SEED=<seed>.
 */
import assert from "node:assert/strict";
import { test } from "node:test";
import { CbtMap, type CbtState } from "../../src/cbt/cbt-map.js";
import { recoverAfterCrash } from "../../src/persist/cbt-recovery.js";
import type { PersistFile } from "../../src/persist/persist-file.js";
import { decodeJournal, RegionJournal } from "../../src/persist/region-journal.js";
import { Prng } from "../helpers/prng.js";

const blockSizeBytes = 4096;
const regionBlocks = 8;
const deviceSizeBytes = 256 * blockSizeBytes;

/** A file that remembers what is durable and what was written since the last fdatasync. */
class RecordingFile implements PersistFile {
  durable: Uint8Array = new Uint8Array(0);
  pending: { positionBytes: number; data: Uint8Array }[] = [];

  async write(positionBytes: number, data: Uint8Array): Promise<void> {
    this.pending.push({ positionBytes, data: data.slice() });
    await Promise.resolve();
  }

  async sync(): Promise<void> {
    await Promise.resolve();
    for (const write of this.pending) this.durable = apply(this.durable, write.positionBytes, write.data);
    this.pending = [];
  }

  async readAll(): Promise<Uint8Array> {
    return this.current();
  }

  async close(): Promise<void> {}

  current(): Uint8Array {
    let image: Uint8Array = this.durable;
    for (const write of this.pending) image = apply(image, write.positionBytes, write.data);
    return image;
  }

  /** A state a crash could leave: durable bytes, then each later write kept, dropped or torn. */
  crashImage(random: Prng): Uint8Array {
    let image: Uint8Array = this.durable;
    for (const write of this.pending) {
      const fate = random.int(0, 2);
      if (fate === 0) continue;
      const keptBytes = fate === 1 ? write.data.byteLength : random.int(0, write.data.byteLength);
      image = apply(image, write.positionBytes, write.data.subarray(0, keptBytes));
    }
    return image;
  }
}

function apply(image: Uint8Array, positionBytes: number, data: Uint8Array): Uint8Array {
  const end = positionBytes + data.byteLength;
  const grown = end > image.byteLength ? new Uint8Array(end) : image.slice();
  if (grown !== image) grown.set(image);
  grown.set(data, positionBytes);
  return grown;
}

interface CrashPoint {
  readonly image: Uint8Array;
  readonly checkpoint: CbtState | null;
  /** The exact write map over the writes that reached the backend before the crash. */
  readonly issued: Uint8Array;
  readonly generationId: string;
}

async function runWorkload(random: Prng, crashes: CrashPoint[], crashesWanted: number): Promise<void> {
  const cbt = new CbtMap(deviceSizeBytes, blockSizeBytes);
  const file = new RecordingFile();
  const numbers = cbt.exportNumbers();
  const journal = await RegionJournal.start(
    file,
    {
      ...numbers,
      blockSizeBytes,
      deviceSizeBytes,
      regionBlocks,
      backendIdentity: { kind: "file", dev: "1", ino: "2", size: String(deviceSizeBytes) },
      bootId: "boot",
      checkpointGenerationId: null,
    },
    null,
    (error) => assert.fail(`journal broke: ${String(error)}`),
  );
  let checkpoint: CbtState | null = null;
  let checkpointGenerationId: string | null = null;
  const issued = new Uint8Array(deviceSizeBytes / blockSizeBytes);
  let generationId = cbt.exportNumbers().generationId;
  const inFlight = new Set<Promise<void>>();

  const crashNow = () => {
    crashes.push({ image: file.crashImage(random), checkpoint, issued: issued.slice(), generationId });
  };

  while (crashes.length < crashesWanted) {
    const action = random.int(0, 99);
    if (action < 70) {
      const firstBlock = random.int(0, issued.length - 1);
      const blocks = random.int(1, Math.min(20, issued.length - firstBlock));
      const offsetBytes = firstBlock * blockSizeBytes + random.int(0, blockSizeBytes - 1);
      const lengthBytes = (blocks - 1) * blockSizeBytes + 1;
      cbt.set(offsetBytes, lengthBytes);
      const active = cbt.exportNumbers().snapNumberActive;
      const write = (async () => {
        await journal.beforeWrite(offsetBytes, lengthBytes);
        // Issued to the backend: from here on a crash must not lose it.
        const first = Math.floor(offsetBytes / blockSizeBytes);
        const last = Math.floor((offsetBytes + lengthBytes - 1) / blockSizeBytes);
        for (let block = first; block <= last; block++) issued[block] = Math.max(issued[block]!, active);
      })();
      inFlight.add(write);
      void write.then(() => inFlight.delete(write));
    } else if (action < 80) {
      await Promise.all(inFlight);
      cbt.switchAtTake(deviceSizeBytes);
      const after = cbt.exportNumbers();
      if (after.generationId !== generationId) {
        generationId = after.generationId;
        issued.fill(0);
      }
      await journal.afterTake(after);
    } else if (action < 88) {
      const token = journal.checkpointBegin();
      const state = cbt.exportState();
      checkpoint = state;
      if (checkpointGenerationId !== state.generationId) {
        await journal.setCheckpointGeneration(state.generationId);
        checkpointGenerationId = state.generationId;
      }
      await journal.checkpointDone(token);
    } else if (action < 94) {
      await new Promise((resolve) => setImmediate(resolve));
    } else {
      crashNow();
    }
  }
  await Promise.all(inFlight);
}

void test("no crash state of the CBT journal under-reports a block that reached the backend", async (t) => {
  const random = Prng.fromEnvironment();
  t.diagnostic(`seed ${random.seed} (replay with BLOCKSNAP_SEED=${random.seed})`);
  const crashes: CrashPoint[] = [];
  for (let run = 0; run < 6; run++) await runWorkload(random, crashes, (run + 1) * 60);
  let recovered = 0;
  let overReportedBlocks = 0;
  for (const [index, crash] of crashes.entries()) {
    let journal: ReturnType<typeof decodeJournal>;
    try {
      journal = decodeJournal(crash.image);
    } catch (error) {
      // Only a journal whose first header never reached the disk may be unreadable: a new generation.
      assert.ok(crash.image.byteLength < 8192 || String(error).includes("header"), String(error));
      continue;
    }
    const result = recoverAfterCrash(crash.checkpoint, null, journal);
    if (result.kind === "untrusted") continue;
    recovered++;
    const { state } = result.recovery;
    if (state.generationId !== crash.generationId) {
      // The journal still names the generation before a reset whose header was not durable yet: every
      // block written since then must then be raised as well, which the check below still demands.
      assert.ok(journal.header.generationId !== crash.generationId);
    }
    for (let block = 0; block < crash.issued.length; block++) {
      const expected = crash.issued[block]!;
      if (expected === 0) continue;
      assert.ok(
        state.writeMap[block]! >= expected || state.generationId !== crash.generationId,
        `crash ${index}: block ${block} written at ${expected} recovered as ${state.writeMap[block]}`,
      );
      if (state.writeMap[block]! > expected) overReportedBlocks++;
    }
  }
  assert.ok(recovered > crashes.length / 2, `only ${recovered} of ${crashes.length} crash states recovered`);
  t.diagnostic(
    `${crashes.length} crash states, ${recovered} recovered, ${overReportedBlocks} block reports above exact`,
  );
});

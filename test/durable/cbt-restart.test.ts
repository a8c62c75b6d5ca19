/**
 * The CBT generation across restarts, through the real daemon: kept after a clean stop; renewed, with the
 * reason, when the backend was modified while no daemon served it, when it was replaced by another file,
 * or when the saved state is damaged — never a stale map taken for a current one.
 */
import assert from "node:assert/strict";
import { appendFile, mkdtemp, readFile, rename, rm, writeFile } from "node:fs/promises";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { after, before, test } from "node:test";
import type { CbtInfoView } from "../../src/daemon/api-types.js";
import { DaemonProcess } from "../cli/cli-harness.js";

let directory = "";

before(async () => {
  directory = await mkdtemp(join(tmpdir(), "blocksnap-cbt-restart-"));
});

after(async () => {
  await rm(directory, { recursive: true, force: true });
});

/** Starts a daemon on `stateDir`, returns the CBT info of `name`, and stops it cleanly. */
async function cbtAfterStart(
  stateDir: string,
  name: string,
  setup?: (daemon: DaemonProcess) => Promise<void>,
) {
  const daemon = await DaemonProcess.start(stateDir);
  try {
    await setup?.(daemon);
    return await daemon.cliJson<CbtInfoView>(["cbt", "info", name]);
  } finally {
    assert.equal((await daemon.stop()).code, 0, daemon.stderr);
  }
}

void test("a backend modified, replaced, or a damaged state file while stopped: a new generation that says why", async () => {
  const stateDir = join(directory, "state");
  const backend = join(directory, "d0.img");
  const first = await cbtAfterStart(stateDir, "d0", async (daemon) => {
    await daemon.cliOk(["device", "add", "d0", "--backend", backend, "--size", "1M"]);
  });
  assert.equal(first.generationReason, "attached");

  const kept = await cbtAfterStart(stateDir, "d0");
  assert.equal(kept.generationId, first.generationId);
  assert.equal(kept.generationReason, "restored");
  assert.equal(kept.generationStartedAt, first.generationStartedAt);

  // Written behind blocksnap's back: CBT cannot know which blocks changed.
  await appendFile(backend, "");
  await writeFile(backend, Buffer.alloc(4096, 1), { flag: "r+" });
  const modified = await cbtAfterStart(stateDir, "d0");
  assert.notEqual(modified.generationId, kept.generationId);
  assert.equal(
    modified.generationReason,
    "untrusted: the backend was modified while blocksnap was not serving it",
  );

  // Replaced by another file of the same size under the same name.
  const copy = join(directory, "d0.copy");
  await writeFile(copy, await readFile(backend));
  await rename(copy, backend);
  const replaced = await cbtAfterStart(stateDir, "d0");
  assert.notEqual(replaced.generationId, modified.generationId);
  assert.equal(replaced.generationReason, "untrusted: the backend is not the same file or device");

  // One flipped bit in the saved state.
  const statePath = join(stateDir, "cbt", "d0.cbt");
  const saved = await readFile(statePath);
  saved[saved.length - 40] = (saved[saved.length - 40] ?? 0) ^ 1;
  await writeFile(statePath, saved);
  const damaged = await cbtAfterStart(stateDir, "d0");
  assert.notEqual(damaged.generationId, replaced.generationId);
  assert.equal(damaged.generationReason, "untrusted: CBT state: checksum mismatch");

  // And the next clean restart keeps that new generation again.
  const again = await cbtAfterStart(stateDir, "d0");
  assert.equal(again.generationId, damaged.generationId);
  assert.equal(again.generationReason, "restored");
});

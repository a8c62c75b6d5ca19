/**
 * Freeze around take under load, as root through the real daemon and CLI, on an ext4 on a loop device
 * over a blocksnap FUSE file:
 * - a writer running through the take is blocked only while the file system is frozen: the freeze window
 *   (frozenMs of the take report) and the writer's longest stall are printed, not asserted (no timed
 *   assertions); the writer must finish (no deadlock);
 * - deadlock guard: freezing flushes dirty data through the loop device into blocksnap's own FUSE file, so
 *   the daemon must serve those writes while fsfreeze waits. 64 MiB of dirty data right before the take;
 *   the take must return within its bound, with the data in the image.
 */
import assert from "node:assert/strict";
import { spawn } from "node:child_process";
import { readFile } from "node:fs/promises";
import { join } from "node:path";
import { after, afterEach, before, test } from "node:test";
import type { SnapshotView } from "../../src/daemon/api-types.js";
import {
  checksums,
  type FileSystemOnDevice,
  FreezeDaemonFixture,
  frozenMounts,
  MiB,
  mustFreezeAndThaw,
  mustShell,
  mustWriteAndSync,
  skipReason,
  skipUnless,
  takeTimeoutMs,
} from "./freeze-fixture.js";

const reason = skipReason(["mkfs.ext4", "dd"]);
let fixture: FreezeDaemonFixture | undefined;
let ext4: FileSystemOnDevice;
const writerTimeoutMs = 30_000;

before(async () => {
  if (reason) return;
  fixture = await FreezeDaemonFixture.start("freeze-load");
  ext4 = await fixture.fileSystem("disk0", "ext4", 256 * MiB);
  fixture.keepCurrent();
});

afterEach(async () => {
  await fixture?.rollback();
});

after(async () => {
  await fixture?.cleanup();
});

/**
 * A writer in its own process: 4 KiB buffered pwrites of a timestamp, cycling over an 8 MiB file, about
 * one per millisecond, until the stop file exists or its time runs out. It prints "ready", then at the end
 * its write count and its longest gap between two writes (the stall), as JSON.
 */
const writerScript = `
const fs = require("node:fs");
const [file, stopFile, maxMs] = process.argv.slice(1);
const fd = fs.openSync(file, "w");
const block = Buffer.alloc(4096);
const pause = new Int32Array(new SharedArrayBuffer(4));
const startMs = performance.now();
let lastMs = startMs, maxGapMs = 0, writes = 0;
fs.writeSync(1, "ready\\n");
while (performance.now() - startMs < Number(maxMs)) {
  if (writes % 16 === 0 && fs.existsSync(stopFile)) break;
  block.write(String(Date.now()) + "\\n");
  fs.writeSync(fd, block, 0, block.length, (writes % 2048) * 4096);
  const nowMs = performance.now();
  maxGapMs = Math.max(maxGapMs, nowMs - lastMs);
  lastMs = nowMs;
  writes++;
  Atomics.wait(pause, 0, 0, 1);
}
fs.closeSync(fd);
fs.writeSync(1, JSON.stringify({ writes, maxGapMs }) + "\\n");
`;

test("a writer running through the take stalls only for the freeze window and finishes", async (t) => {
  if (!skipUnless(t, reason) || !fixture) return;
  const f = fixture;
  const stopFile = join(f.directory, "stop-writer");
  const writer = spawn(
    process.execPath,
    ["-e", writerScript, join(ext4.mountPoint, "timestamps"), stopFile, `${writerTimeoutMs}`],
    { stdio: ["ignore", "pipe", "pipe"] },
  );
  t.after(() => {
    if (writer.exitCode === null && writer.signalCode === null) writer.kill("SIGKILL");
  });
  let stdout = "";
  let stderr = "";
  writer.stdout.setEncoding("utf8").on("data", (text: string) => {
    stdout += text;
  });
  writer.stderr.setEncoding("utf8").on("data", (text: string) => {
    stderr += text;
  });
  const exited = new Promise<number | null>((resolve) => writer.once("close", (code) => resolve(code)));
  await new Promise<void>((resolve, reject) => {
    const check = (): void => {
      if (stdout.includes("ready")) resolve();
    };
    writer.stdout.on("data", check);
    void exited.then(() => reject(new Error(`writer ended before it was ready: ${stderr}`)));
  });
  // Let it dirty some pages first, so the freeze has writes to block and data to flush.
  await new Promise((resolve) => setTimeout(resolve, 300));

  const id = await f.createSnapshot(["--storage", f.directory, "--limit", "256M", "--device", "disk0"]);
  const taken = await f.cliJson<SnapshotView>(["snapshot", "take", id], takeTimeoutMs);
  await mustShell('touch "$1"', [stopFile]);
  const code = await Promise.race([
    exited,
    new Promise<"hung">((resolve) => setTimeout(resolve, writerTimeoutMs + 5000, "hung").unref()),
  ]);
  assert.equal(code, 0, `the writer finished (no deadlock): ${stderr}`);
  const result = JSON.parse(stdout.slice(stdout.indexOf("{"))) as { writes: number; maxGapMs: number };
  assert.ok(result.writes > 0);
  assert.deepEqual(frozenMounts(taken), [{ device: "disk0", mountPoint: ext4.mountPoint, error: null }]);
  const frozen = taken.takeReport?.frozen[0];
  assert.ok(frozen);
  t.diagnostic(
    `freeze call ${frozen.freezeMs.toFixed(1)} ms + frozen ${frozen.frozenMs.toFixed(1)} ms; writer's longest stall ${result.maxGapMs.toFixed(1)} ms over ${result.writes} writes; origin writes held by the take ${taken.takeStallMs?.toFixed(2)} ms`,
  );
  await mustWriteAndSync(ext4.mountPoint);
  await mustFreezeAndThaw(ext4.mountPoint);
  await f.destroySnapshot(id);
});

test("deadlock guard: 64 MiB of dirty data flushed by the freeze through blocksnap's own FUSE file; the take returns, the data is in the image", async (t) => {
  if (!skipUnless(t, reason) || !fixture) return;
  const f = fixture;
  const big = await mustShell(
    'dd if=/dev/urandom of="$1/big" bs=1M count=64 status=none && sha256sum "$1/big" | cut -d" " -f1',
    [ext4.mountPoint],
  );
  const dirtyKiB = /^Dirty:\s+(\d+) kB/m.exec(await readFile("/proc/meminfo", "utf8"))?.[1];
  const id = await f.createSnapshot(["--storage", f.directory, "--limit", "256M", "--device", "disk0"]);
  const taken = await f.cliJson<SnapshotView>(["snapshot", "take", id], takeTimeoutMs);
  assert.deepEqual(frozenMounts(taken), [{ device: "disk0", mountPoint: ext4.mountPoint, error: null }]);
  t.diagnostic(
    `dirty before take ${dirtyKiB} KiB (machine-wide); freeze call ${taken.takeReport?.frozen[0]?.freezeMs.toFixed(1)} ms, frozen ${taken.takeReport?.frozen[0]?.frozenMs.toFixed(1)} ms`,
  );
  await mustWriteAndSync(ext4.mountPoint);
  const image = await f.attachLoop(`disk0@${id}`, true);
  const imageFs = await f.mount(image, "image-disk0", ["-o", "ro"]);
  const inImage = await checksums(imageFs, "big");
  assert.equal(inImage.split(" ")[0], big.trim(), "the 64 MiB written without sync is in the image");
  await f.unmount(imageFs);
  await f.detachLoop(image);
  await f.destroySnapshot(id);
});

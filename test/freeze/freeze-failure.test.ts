/**
 * Freeze around take when things go wrong, as root through the real daemon and CLI, with two ext4 file
 * systems on loop devices over blocksnap FUSE files: a take that fails after freezing (the difference
 * storage cannot hold one chunk: ENOSPC) still thaws every file system and the CLI reports the error; a
 * pre-take hook that fails and a post-take hook that hangs are reported in `snapshot info` and leave
 * nothing frozen (the hung hook is killed at the freeze timeout); a file system mounted twice is frozen
 * once; a freeze that cannot finish because the FUSE server stopped answering is bounded by the timeout,
 * and the file system is thawed once that freeze completes after all.
 */
import assert from "node:assert/strict";
import { readFile } from "node:fs/promises";
import { join } from "node:path";
import { after, afterEach, before, test } from "node:test";
import type { SnapshotView, TakeReportView } from "../../src/daemon/api-types.js";
import { LoopFreezer } from "../../src/freeze/loop-freezer.js";
import {
  type FileSystemOnDevice,
  FreezeDaemonFixture,
  frozenMounts,
  MiB,
  mustFreezeAndThaw,
  mustShell,
  mustWriteAndSync,
  runBounded,
  skipReason,
  skipUnless,
  takeTimeoutMs,
  writeUnsyncedFiles,
} from "./freeze-fixture.js";

const reason = skipReason(["mkfs.ext4"]);
let fixture: FreezeDaemonFixture | undefined;
let first: FileSystemOnDevice;
let second: FileSystemOnDevice;

before(async () => {
  if (reason) return;
  fixture = await FreezeDaemonFixture.start("freeze-failure");
  first = await fixture.fileSystem("disk0", "ext4", 64 * MiB);
  second = await fixture.fileSystem("disk1", "ext4", 64 * MiB);
  fixture.keepCurrent();
});

afterEach(async () => {
  await fixture?.rollback();
});

after(async () => {
  await fixture?.cleanup();
});

async function mustBeThawed(...fileSystems: FileSystemOnDevice[]): Promise<void> {
  for (const fs of fileSystems) {
    await mustWriteAndSync(fs.mountPoint);
    await mustFreezeAndThaw(fs.mountPoint);
  }
}

test("a take that fails after freezing (ENOSPC) thaws every file system, reports the error, and runs post-take with 'failed'", async (t) => {
  if (!skipUnless(t, reason) || !fixture) return;
  const f = fixture;
  const hookLog = join(f.directory, "failed-take.log");
  await writeUnsyncedFiles(first.mountPoint, "enospc-", 2);
  await writeUnsyncedFiles(second.mountPoint, "enospc-", 2);
  // A file storage of one chunk's limit: create accepts it for one device (the limit is at least a chunk
  // per listed device), but its reserved head leaves no room for a chunk, and the device added after
  // create is not counted; the take then finds that the storage cannot hold a single chunk.
  const id = await f.createSnapshot([
    "--storage",
    f.directory,
    "--limit",
    "64K",
    "--chunk-size",
    "64K",
    "--device",
    "disk0",
    "--post-take",
    `echo "$BLOCKSNAP_TAKE_RESULT" >> ${hookLog}`,
  ]);
  const added = await f.cli(["snapshot", "add", id, "--device", "disk1"], takeTimeoutMs);
  assert.equal(added.code, 0, added.stderr);

  const take = await f.cli(["snapshot", "take", id], takeTimeoutMs);
  assert.equal(take.timedOut, false, "the take returned");
  assert.equal(take.code, 1, take.stdout);
  assert.match(take.stderr, /^blocksnap: .*cannot hold a single 65536-byte chunk/m);

  const info = await f.snapshotInfo(id);
  assert.equal(info.state, "created", "a failed take leaves the snapshot untaken");
  assert.deepEqual(
    frozenMounts(info),
    [
      { device: "disk0", mountPoint: first.mountPoint, error: null },
      { device: "disk1", mountPoint: second.mountPoint, error: null },
    ],
    "both file systems were frozen before the take failed",
  );
  assert.equal(info.takeReport?.postTake?.exitCode, 0);
  await mustBeThawed(first, second);

  // Again with --json: the error carries its errno, and the file systems are thawed again.
  const retry = await f.cli(["snapshot", "take", id, "--json"], takeTimeoutMs);
  assert.equal(retry.code, 1);
  assert.equal((JSON.parse(retry.stdout) as { error: { errno: string } }).error.errno, "ENOSPC");
  await mustBeThawed(first, second);
  assert.equal(await readFile(hookLog, "utf8"), "failed\nfailed\n");
  await f.destroySnapshot(id);
});

test("a failing pre-take hook and a hanging post-take hook are reported, bounded by the freeze timeout, and leave nothing frozen", async (t) => {
  if (!skipUnless(t, reason) || !fixture) return;
  const f = fixture;
  // Nothing left to flush, so that each freeze fits in the short bound even on a busy machine.
  for (const fs of [first, second]) await mustShell('sync -f "$1"', [fs.mountPoint]);
  const id = await f.createSnapshot([
    "--storage",
    "memory:",
    "--limit",
    "64M",
    "--device",
    "disk0",
    "disk1",
    "--pre-take",
    "echo about to fail; exit 3",
    "--post-take",
    "sleep 60",
  ]);
  // `sleep 60` outlives the 1000 ms bound; the take must come back soon after it, not after a minute.
  const take = await f.cli(["snapshot", "take", id, "--freeze-timeout", "1000"], takeTimeoutMs);
  assert.equal(take.timedOut, false, "the hung hook did not hold the take");
  assert.equal(take.code, 0, take.stderr);
  assert.match(take.stdout, /^pre-take hook: exit 3 after [0-9.]+ ms: echo about to fail; exit 3$/m);
  assert.match(take.stdout, /^post-take hook: timed out after [0-9.]+ ms: sleep 60$/m);
  for (const fs of [first, second]) {
    const line = take.stdout.split("\n").find((text) => text.includes(fs.mountPoint));
    assert.match(line ?? take.stdout, /^ {4}frozen: +\S+ \(ext4 on \/dev\/loop\d+\) for [0-9.]+ ms/);
  }

  const text = await f.cliOk(["snapshot", "info", id]);
  assert.match(text, /^pre-take hook: exit 3 after [0-9.]+ ms: echo about to fail; exit 3$/m);
  assert.match(text, /^ {2}\| about to fail$/m, "the hook's output is shown");
  assert.match(text, /^post-take hook: timed out after [0-9.]+ ms: sleep 60$/m);
  const info = await f.snapshotInfo(id);
  assert.equal(info.state, "taken", "hook failures do not abort the take");
  assert.equal(info.takeReport?.preTake?.exitCode, 3);
  assert.equal(info.takeReport?.postTake?.timedOut, true);
  t.diagnostic(
    `post-take hook ended after ${info.takeReport?.postTake?.durationMs.toFixed(0)} ms (bound 1000 ms)`,
  );
  assert.deepEqual(frozenMounts(info), [
    { device: "disk0", mountPoint: first.mountPoint, error: null },
    { device: "disk1", mountPoint: second.mountPoint, error: null },
  ]);
  await mustBeThawed(first, second);
  await f.destroySnapshot(id);
});

test("a file system mounted twice (bind mount) is frozen once and thawed", async (t) => {
  if (!skipUnless(t, reason) || !fixture) return;
  const f = fixture;
  const bind = await f.mount(first.mountPoint, "bind-disk0", ["--bind"]);
  const id = await f.createSnapshot(["--storage", "memory:", "--limit", "64M", "--device", "disk0"]);
  const taken = await f.cliJson<SnapshotView>(["snapshot", "take", id], takeTimeoutMs);
  assert.deepEqual(frozenMounts(taken), [{ device: "disk0", mountPoint: first.mountPoint, error: null }]);
  await mustBeThawed(first);
  await f.unmount(bind);
  await f.destroySnapshot(id);
});

/** Resolves with `value` after `ms`, to race a promise that may never settle. */
function hungAfter(ms: number): Promise<"hung"> {
  return new Promise((resolve) => setTimeout(resolve, ms, "hung").unref());
}

test("a freeze stuck behind a FUSE server that stopped answering: bounded by the timeout, reported, and thawed when it completes late", async (t) => {
  if (!skipUnless(t, reason) || !fixture) return;
  const f = fixture;
  // Dirty data that the freeze must flush through the loop device into the (stopped) daemon.
  await writeUnsyncedFiles(first.mountPoint, "stalled-", 3);
  const freezer = new LoopFreezer({ deviceFilePath: (name) => join(f.mountDir, name) });
  const context = {
    snapshotId: "00000000-0000-4000-8000-000000000000",
    deviceNames: ["disk0"],
    preTakeCommand: null,
    postTakeCommand: null,
    timeoutMs: 500,
  };
  process.kill(f.daemon.pid, "SIGSTOP");
  let report: TakeReportView | "hung" = "hung";
  try {
    const session = await Promise.race([freezer.freeze(context), hungAfter(10_000)]);
    if (session === "hung") assert.fail("freeze() did not answer although its timeout ran out");
    report = await Promise.race([session.thaw(null), hungAfter(10_000)]);
  } finally {
    process.kill(f.daemon.pid, "SIGCONT");
  }
  if (report === "hung") assert.fail("thaw() did not answer");
  assert.equal(report.frozen.length, 1);
  assert.match(report.frozen[0]?.error ?? "", /timed out after 500 ms/);

  // The stuck FIFREEZE completes once the daemon serves again; the freezer must then thaw it.
  let thawed = false;
  for (let attempt = 0; attempt < 100 && !thawed; attempt++) {
    const probe = await runBounded("fsfreeze", ["--freeze", first.mountPoint], 5000);
    if (probe.code === 0) {
      await runBounded("fsfreeze", ["--unfreeze", first.mountPoint]);
      thawed = true;
    } else await new Promise((resolve) => setTimeout(resolve, 100));
  }
  assert.ok(thawed, "the late freeze was thawed");
  await mustWriteAndSync(first.mountPoint);
});

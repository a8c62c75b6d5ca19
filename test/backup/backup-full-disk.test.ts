/**
 * A repository on a full file system (issue 13, "repo on a full file system: clear error, nothing lost"),
 * through the real daemon and CLI, on a tmpfs mounted with a small size: `backup create` fills it, prints
 * ONE line naming the repository and ENOSPC and exits 1; the job ends `failed` (and says so in its event);
 * no manifest is written, `backup verify` passes, the device is untouched (cmp of nbdcopy reads before and
 * after); once the file system is larger, the next backup completes and restores to the device's bytes.
 * `backup restore --to FILE` onto a full file system is one line naming the file and ENOSPC, exit 1.
 */
import assert from "node:assert/strict";
import { mkdir, mkdtemp, rm } from "node:fs/promises";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { after, before, test } from "node:test";
import type { BackupJobEvent } from "../../src/daemon/backup-job-events.js";
import type { BackupJobView } from "../../src/daemon/backup-jobs.js";
import { DaemonProcess } from "../cli/cli-harness.js";
import { run, runOk, which } from "../helpers/commands.js";
import { jsonLines } from "./backup-helpers.js";

const MiB = 1024 * 1024;
const deviceBytes = 32 * MiB;
let directory = "";
let daemon: DaemonProcess | null = null;
const mounted: string[] = [];

before(async () => {
  directory = await mkdtemp(join(tmpdir(), "blocksnap-full-disk-"));
});
after(async () => {
  await daemon?.stop("SIGKILL");
  for (const path of mounted.reverse()) await run("umount", [path]);
  await rm(directory, { recursive: true, force: true });
});

async function mountTmpfs(path: string, sizeBytes: number): Promise<void> {
  await mkdir(path, { recursive: true });
  await runOk("mount", ["-t", "tmpfs", "-o", `size=${sizeBytes}`, "tmpfs", path]);
  mounted.push(path);
}

/** The device's bytes as a client sees them, into a file (nbdcopy over the daemon's NBD socket). */
async function readDevice(name: string, path: string): Promise<void> {
  assert.ok(daemon !== null);
  await runOk("nbdcopy", [`nbd+unix:///${name}?socket=${daemon.nbdSocket}`, path]);
}

/** stderr's non-empty lines. */
function linesOf(stderr: string): string[] {
  return stderr.split("\n").filter((line) => line.trim() !== "");
}

void test("a repository on a full file system: one clear line, job failed, nothing lost, next backup works", async (t) => {
  if (process.getuid?.() !== 0) return t.skip("needs root to mount a small tmpfs");
  if (!which("nbdcopy")) return t.skip("needs nbdcopy (libnbd-bin)");
  daemon = await DaemonProcess.start(join(directory, "state"));
  const backend = join(directory, "d0.img");
  // Random bytes do not compress: 32 MiB of chunks cannot fit in 8 MiB.
  await runOk("dd", [
    "if=/dev/urandom",
    `of=${backend}`,
    "bs=1M",
    `count=${deviceBytes / MiB}`,
    "status=none",
  ]);
  await daemon.cliOk(["device", "add", "d0", "--backend", backend]);
  const before = join(directory, "before.img");
  await readDevice("d0", before);

  const tiny = join(directory, "tiny");
  await mountTmpfs(tiny, 8 * MiB);
  const repository = join(tiny, "repo");
  await daemon.cliOk(["backup", "init", "--repo", repository, "--chunk-size", "1M"]);

  const full = await daemon.cli(["backup", "create", "--device", "d0", "--repo", repository]);
  assert.equal(full.code, 1, full.stdout + full.stderr);
  const lines = linesOf(full.stderr);
  assert.equal(lines.length, 1, `one line: ${full.stderr}`);
  assert.ok(lines[0]?.includes(`repository ${repository}`), lines[0]);
  assert.match(lines[0] ?? "", /No space left/);
  assert.match(lines[0] ?? "", /\(ENOSPC\)$/);
  assert.match(lines[0] ?? "", /no backup of d0 was written/);

  // The job failed, and its last event says so with the same message.
  const { jobs } = await daemon.cliJson<{ jobs: BackupJobView[] }>(["backup", "status"]);
  const job = jobs.find((candidate) => candidate.repository === repository);
  assert.ok(job !== undefined);
  assert.equal(job.state, "failed");
  assert.equal(job.error?.errno, "ENOSPC");
  const events = jsonLines(
    await daemon.cliOk(["backup", "events", "--job", job.id, "--json"]),
  ) as BackupJobEvent[];
  const last = events.at(-1);
  assert.ok(last?.type === "failed", JSON.stringify(events));
  assert.equal(last.errno, "ENOSPC");
  assert.equal(last.message, job.error?.message);

  // Nothing lost: no manifest, the repository verifies, no snapshot left, the device as it was.
  const listed = await daemon.cliJson<{ backups: unknown[] }>(["backup", "list", "--repo", repository]);
  assert.deepEqual(listed.backups, []);
  const verify = await daemon.cli(["backup", "verify", "--repo", repository]);
  assert.equal(verify.code, 0, verify.stdout + verify.stderr);
  const snapshots = await daemon.cliJson<{ snapshots: unknown[] }>(["snapshot", "list"]);
  assert.deepEqual(snapshots.snapshots, []);
  const afterwards = join(directory, "after.img");
  await readDevice("d0", afterwards);
  const unchanged = await run("cmp", [before, afterwards]);
  assert.equal(unchanged.code, 0, unchanged.stdout + unchanged.stderr);
  const backendUnchanged = await run("cmp", [before, backend]);
  assert.equal(backendUnchanged.code, 0, backendUnchanged.stdout + backendUnchanged.stderr);

  // More space: the next backup completes, verifies and restores to the device's bytes.
  await runOk("mount", ["-o", `remount,size=${64 * MiB}`, tiny]);
  const next = await daemon.cli(["backup", "create", "--device", "d0", "--repo", repository]);
  assert.equal(next.code, 0, next.stderr);
  const verifyNext = await daemon.cli(["backup", "verify", "--repo", repository]);
  assert.equal(verifyNext.code, 0, verifyNext.stdout + verifyNext.stderr);
  const restored = join(directory, "restored.img");
  await daemon.cliOk(["backup", "restore", "d0/latest", "--repo", repository, "--to", restored]);
  const same = await run("cmp", [before, restored]);
  assert.equal(same.code, 0, same.stdout + same.stderr);

  // Restore to a file on a full file system: one line naming the file and ENOSPC.
  const small = join(directory, "small");
  await mountTmpfs(small, 4 * MiB);
  const target = join(small, "out.img");
  const onFull = await daemon.cli(["backup", "restore", "d0/latest", "--repo", repository, "--to", target]);
  assert.equal(onFull.code, 1, onFull.stdout + onFull.stderr);
  const restoreLines = linesOf(onFull.stderr);
  assert.equal(restoreLines.length, 1, `one line: ${onFull.stderr}`);
  assert.ok(restoreLines[0]?.includes(target), restoreLines[0]);
  assert.match(restoreLines[0] ?? "", /no space left/);
  assert.match(restoreLines[0] ?? "", /\(ENOSPC\)$/);
});

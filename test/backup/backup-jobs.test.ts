/**
 * Backup job control through the real daemon and CLI (issue 13, "User experience"): `backup create --json`
 * streams progress lines then the result; Ctrl-C of the following CLI leaves the job running (it says how
 * to follow it) and `backup status JOB` follows it to the end; `backup create --detach` then
 * `backup cancel JOB` ends a job `cancelled`, with its own snapshot destroyed, no manifest written and a
 * repository that verifies and takes the next backup; on a terminal the progress line is redrawn in place.
 */
import assert from "node:assert/strict";
import { spawn } from "node:child_process";
import { mkdtemp, rm } from "node:fs/promises";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { after, before, test } from "node:test";
import type { BackupJobView } from "../../src/daemon/backup-jobs.js";
import { cleanEnvironment, cliPath, DaemonProcess } from "../cli/cli-harness.js";
import { run, runOk, which } from "../helpers/commands.js";
import { backupJson, fillDeviceRandom, jsonLines, startCancelledBackup } from "./backup-helpers.js";

const MiB = 1024 * 1024;
const deviceBytes = 256 * MiB;
const statusPollsMax = 600;
const cancelAttemptsMax = 3;
let directory = "";
let daemon: DaemonProcess | null = null;

before(async () => {
  directory = await mkdtemp(join(tmpdir(), "blocksnap-backup-jobs-"));
});
after(async () => {
  await daemon?.stop("SIGKILL");
  await rm(directory, { recursive: true, force: true });
});

interface ProgressLine {
  readonly progress: {
    readonly job: string;
    readonly phase: string;
    readonly doneBytes: number;
    readonly totalBytes: number;
    readonly bytesPerSecond: number | null;
    readonly etaSeconds: number | null;
  };
}

async function statusOf(id: string): Promise<BackupJobView> {
  assert.ok(daemon !== null);
  return await daemon.cliJson<BackupJobView>(["backup", "status", id]);
}

async function waitEnded(id: string): Promise<BackupJobView> {
  for (let poll = 0; poll < statusPollsMax; poll++) {
    const job = await statusOf(id);
    if (job.state !== "running") return job;
    await new Promise((resolve) => setTimeout(resolve, 100));
  }
  assert.fail(`backup job ${id} did not end`);
}

/** Runs `backup create --json`, sends SIGINT once a progress line of the reading phase arrived. */
function createThenInterrupt(
  args: readonly string[],
): Promise<{ code: number | null; stdout: string; stderr: string }> {
  return new Promise((resolve, reject) => {
    const child = spawn(process.execPath, [cliPath, ...args], {
      env: cleanEnvironment(),
      stdio: ["ignore", "pipe", "pipe"],
    });
    let stdout = "";
    let stderr = "";
    let interrupted = false;
    const timer = setTimeout(() => child.kill("SIGKILL"), 120_000);
    child.stdout.setEncoding("utf8").on("data", (text: string) => {
      stdout += text;
      if (!interrupted && /"phase":"reading","totalBytes":\d+,"doneBytes":[1-9]/.test(stdout)) {
        interrupted = true;
        child.kill("SIGINT");
      }
    });
    child.stderr.setEncoding("utf8").on("data", (text: string) => {
      stderr += text;
    });
    child.once("error", reject);
    child.once("close", (code) => {
      clearTimeout(timer);
      resolve({ code, stdout, stderr });
    });
  });
}

void test("backup jobs: --json progress, Ctrl-C leaves the job, status follows it, cancel ends one cleanly", async (t) => {
  if (!which("nbdcopy")) return t.skip("needs nbdcopy (libnbd-bin)");
  daemon = await DaemonProcess.start(join(directory, "state"));
  const backend = join(directory, "d0.img");
  await runOk("truncate", ["-s", String(deviceBytes), backend]);
  await daemon.cliOk(["device", "add", "d0", "--backend", backend]);
  await fillDeviceRandom(daemon.nbdSocket, "d0", deviceBytes / MiB, join(directory, "first.random"));
  const repository = join(directory, "repo");
  await daemon.cliOk(["backup", "init", "--repo", repository, "--chunk-size", "1M"]);
  const stateDir = ["--state-dir", daemon.stateDir];

  // --json: progress lines, then Ctrl-C of the CLI: the job goes on.
  const followed = await createThenInterrupt([
    "backup",
    "create",
    "--device",
    "d0",
    "--repo",
    repository,
    "--json",
    ...stateDir,
  ]);
  assert.equal(followed.code, 130, followed.stderr);
  const lines = jsonLines(followed.stdout) as ProgressLine[];
  assert.ok(lines.length >= 1);
  const jobId = lines[0]?.progress.job ?? "";
  assert.match(followed.stderr, new RegExp(`blocksnap backup status ${jobId}`));
  let previous = -1;
  for (const line of lines) {
    assert.equal(line.progress.job, jobId, "only progress lines before the interrupt");
    if (line.progress.phase !== "reading") continue;
    assert.equal(line.progress.totalBytes, deviceBytes);
    assert.ok(line.progress.doneBytes > previous, "each line is an update");
    previous = line.progress.doneBytes;
    if (line.progress.bytesPerSecond !== null) assert.ok(line.progress.etaSeconds !== null);
  }
  const afterInterrupt = await statusOf(jobId.slice(0, 8));
  assert.equal(afterInterrupt.id, jobId);
  assert.notEqual(afterInterrupt.state, "cancelled");
  assert.equal(afterInterrupt.cancelRequested, false, "Ctrl-C of the CLI did not cancel the job");
  const followedDone = await waitEnded(jobId);
  assert.equal(followedDone.state, "done", JSON.stringify(followedDone.error));
  const human = await daemon.cliOk(["backup", "status", jobId]);
  assert.match(human, /state:\s+done/);
  assert.match(human, new RegExp(`backup:\\s+d0/${followedDone.backupId}`));

  // New data, then a detached full backup cancelled while it runs.
  await fillDeviceRandom(daemon.nbdSocket, "d0", deviceBytes / MiB, join(directory, "second.random"));
  let cancelled: BackupJobView | null = null;
  for (let attempt = 0; attempt < cancelAttemptsMax && cancelled === null; attempt++) {
    const id = await startCancelledBackup(daemon.controlSocket, "d0", repository);
    // The cancel was asked for; `backup cancel` answers once the job has ended.
    const answer = await daemon.cli(["backup", "cancel", id, "--json"]);
    if (answer.code === 0) cancelled = JSON.parse(answer.stdout) as BackupJobView;
    else assert.match(answer.stderr, /already ended \(done\)/, "only a job that ended first is refused");
  }
  assert.ok(cancelled !== null, `no cancel caught a running job in ${cancelAttemptsMax} attempts`);
  assert.equal(cancelled.state, "cancelled");
  assert.equal(cancelled.cancelRequested, true);
  assert.equal(cancelled.error?.errno, "ECANCELED");
  assert.equal(cancelled.backupId, null);
  const again = await daemon.cliJson<BackupJobView>(["backup", "cancel", cancelled.id]);
  assert.equal(again.state, "cancelled", "cancelling a cancelled job answers as it is");
  const snapshots = await daemon.cliJson<{ snapshots: unknown[] }>(["snapshot", "list"]);
  assert.deepEqual(snapshots.snapshots, [], "the job's own snapshot was destroyed");
  const listed = await daemon.cliJson<{ backups: { id: string }[] }>([
    "backup",
    "list",
    "--repo",
    repository,
  ]);
  const backupIds = listed.backups.map((backup) => backup.id);
  assert.ok(backupIds.includes(followedDone.backupId ?? ""));
  const verify = await run(process.execPath, [cliPath, "backup", "verify", "--repo", repository]);
  assert.equal(verify.code, 0, verify.stdout + verify.stderr);
  const unknown = await daemon.cli(["backup", "cancel", "no-such-job"]);
  assert.equal(unknown.code, 1);
  assert.match(unknown.stderr, /No backup job no-such-job/);

  // The next backup completes and restores.
  const next = await backupJson<BackupJobView>(daemon, [
    "backup",
    "create",
    "--device",
    "d0",
    "--repo",
    repository,
  ]);
  assert.equal(next.state, "done");
  const restored = join(directory, "restored.img");
  await daemon.cliOk(["backup", "restore", "d0/latest", "--repo", repository, "--to", restored]);
  const cmp = await run("cmp", [restored, backend]);
  assert.equal(cmp.code, 0, cmp.stdout + cmp.stderr);
});

void test("backup create on a terminal redraws one progress line in place", async (t) => {
  if (!which("script")) return t.skip("needs script (util-linux) for a pseudo-terminal");
  if (daemon === null) return t.skip("needs the daemon and device of the job test (skipped)");
  const repository = join(directory, "tty-repo");
  await daemon.cliOk(["backup", "init", "--repo", repository]);
  const command = [process.execPath, cliPath, "backup", "create", "--device", "d0", "--repo", repository]
    .concat(["--state-dir", daemon.stateDir])
    .map((word) => `'${word}'`)
    .join(" ");
  const result = await run("script", ["-qec", command, "/dev/null"]);
  assert.equal(result.code, 0, result.stdout + result.stderr);
  const redraw = "\r\u001b[K";
  assert.ok(result.stdout.includes(`${redraw}backup d0: `), "a line redrawn in place");
  assert.ok(
    result.stdout
      .split(redraw)
      .slice(1)
      .some((rest) => !rest.startsWith("backup d0:")),
    "cleared at the end",
  );
  assert.match(result.stdout, /backup d0\/\S+: full backup/);
});

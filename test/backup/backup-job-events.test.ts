/**
 * Backup job events through the real daemon and CLI (issue 13, "long jobs run in the daemon … events"):
 * a `backup events --follow` started before the job, in another CLI process, sees `started` (level and
 * reason) then `finished` (backup, bytes, new bytes, duration) of a `backup create --detach`, in order and
 * with the job's id, and `--job ID --follow` ends by itself when the job does; a cancelled job ends with
 * `cancelled`, a job with a wrong key with `failed` and the error's message; a restore onto a device emits
 * its own started/finished; the events are in the daemon's log; a cursor from elsewhere is refused.
 */
import assert from "node:assert/strict";
import { mkdtemp, rm } from "node:fs/promises";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { after, before, test } from "node:test";
import type { BackupJobEvent } from "../../src/daemon/backup-job-events.js";
import type { BackupJobView } from "../../src/daemon/backup-jobs.js";
import { BackgroundCli, DaemonProcess } from "../cli/cli-harness.js";
import { runOk, which } from "../helpers/commands.js";
import { fillDeviceRandom, jsonLines, startCancelledBackup } from "./backup-helpers.js";

const MiB = 1024 * 1024;
const deviceBytes = 128 * MiB;
const cancelAttemptsMax = 3;
const statusPollsMax = 600;
let directory = "";
let daemon: DaemonProcess | null = null;

type SequencedEvent = BackupJobEvent & { readonly seq: number };

before(async () => {
  directory = await mkdtemp(join(tmpdir(), "blocksnap-job-events-"));
});
after(async () => {
  await daemon?.stop("SIGKILL");
  await rm(directory, { recursive: true, force: true });
});

/** Every kept event of one job, read without --follow. */
async function eventsOf(jobId: string): Promise<SequencedEvent[]> {
  assert.ok(daemon !== null);
  const result = await daemon.cli(["backup", "events", "--job", jobId, "--json"]);
  assert.equal(result.code, 0, result.stderr);
  return jsonLines(result.stdout) as SequencedEvent[];
}

async function waitEnded(id: string): Promise<BackupJobView> {
  assert.ok(daemon !== null);
  for (let poll = 0; poll < statusPollsMax; poll++) {
    const job = await daemon.cliJson<BackupJobView>(["backup", "status", id]);
    if (job.state !== "running") return job;
    await new Promise((resolve) => setTimeout(resolve, 100));
  }
  assert.fail(`job ${id} did not end`);
}

void test("backup job events: followed from another CLI, started→finished, cancelled, failed, restore", async (t) => {
  if (!which("nbdcopy")) return t.skip("needs nbdcopy (libnbd-bin)");
  daemon = await DaemonProcess.start(join(directory, "state"));
  const stateDir = ["--state-dir", daemon.stateDir];
  for (const name of ["d0", "d1"]) {
    await runOk("truncate", ["-s", String(deviceBytes), join(directory, `${name}.img`)]);
    await daemon.cliOk(["device", "add", name, "--backend", join(directory, `${name}.img`)]);
  }
  await fillDeviceRandom(daemon.nbdSocket, "d0", deviceBytes / MiB, join(directory, "first.random"));
  const repository = join(directory, "repo");
  await daemon.cliOk(["backup", "init", "--repo", repository, "--chunk-size", "1M"]);

  // A follower of every event, started before any job: one long poll, answered when an event comes.
  const follower = new BackgroundCli(["backup", "events", "--follow", "--json", ...stateDir]);
  try {
    const started = await daemon.cliJson<BackupJobView>([
      "backup",
      "create",
      "--device",
      "d0",
      "--repo",
      repository,
      "--detach",
    ]);
    // A second follower of this job alone ends by itself at the job's end.
    const jobFollower = new BackgroundCli([
      "backup",
      "events",
      "--follow",
      "--json",
      "--job",
      started.id.slice(0, 8),
      ...stateDir,
    ]);
    const jobFollowed = await jobFollower.closed;
    assert.equal(jobFollowed.code, 0, jobFollowed.stderr);
    await follower.waitForOutput('"type":"finished"');
    const done = await waitEnded(started.id);
    assert.equal(done.state, "done", JSON.stringify(done.error));
    for (const output of [follower.stdout, jobFollowed.stdout]) {
      const events = (jsonLines(output) as SequencedEvent[]).filter((event) => event.job === started.id);
      assert.deepEqual(
        events.map((event) => event.type),
        ["started", "finished"],
        output,
      );
      const [first, last] = events;
      assert.ok(first?.type === "started" && last?.type === "finished");
      assert.ok(first.seq < last.seq, "in order");
      assert.equal(first.kind, "backup");
      assert.equal(first.device, "d0");
      assert.equal(first.repository, repository);
      assert.equal(first.level, "full");
      assert.equal(first.reason, done.levelReason);
      assert.equal(last.backup, `d0/${done.backupId}`);
      assert.equal(last.level, "full");
      assert.equal(last.bytes, deviceBytes);
      assert.equal(last.newBytesStored, done.result?.newBytesStored);
      assert.ok(last.newBytesStored > 0);
      assert.ok(last.durationMs >= 0 && last.timeMs >= first.timeMs);
    }
  } finally {
    follower.kill("SIGTERM");
    await follower.closed;
  }

  // The human form: one line per event with its #seq.
  const human = await daemon.cliOk(["backup", "events"]);
  assert.match(human, /^#1 .* started +backup d0 job=\S+ +level=full: /m);
  assert.match(human, /^#2 .* finished +backup d0 job=\S+ +d0\/\S+ level=full bytes=128 MiB/m);

  // A cancelled job ends with `cancelled`.
  await fillDeviceRandom(daemon.nbdSocket, "d0", deviceBytes / MiB, join(directory, "second.random"));
  let cancelledId: string | null = null;
  for (let attempt = 0; attempt < cancelAttemptsMax && cancelledId === null; attempt++) {
    const id = await startCancelledBackup(daemon.controlSocket, "d0", repository);
    const answer = await daemon.cli(["backup", "cancel", id, "--json"]);
    if (answer.code === 0) cancelledId = id;
    else assert.match(answer.stderr, /already ended \(done\)/);
  }
  assert.ok(cancelledId !== null, `no cancel caught a running job in ${cancelAttemptsMax} attempts`);
  const cancelledEvents = await eventsOf(cancelledId);
  assert.equal(cancelledEvents.at(-1)?.type, "cancelled", JSON.stringify(cancelledEvents));
  assert.ok(
    cancelledEvents.every((event) => event.type === "started" || event.type === "cancelled"),
    "no finished or failed event",
  );
  assert.ok(cancelledEvents.length <= 2);

  // A job that fails (a wrong key for an encrypted repository) ends with `failed` and its message.
  const keyA = join(directory, "a.key");
  const keyB = join(directory, "b.key");
  await daemon.cliOk(["backup", "key", "create", keyA]);
  await daemon.cliOk(["backup", "key", "create", keyB]);
  const encrypted = join(directory, "encrypted");
  await daemon.cliOk(["backup", "init", "--repo", encrypted, "--key", keyA]);
  const failing = await daemon.cli([
    "backup",
    "create",
    "--device",
    "d0",
    "--repo",
    encrypted,
    "--key",
    keyB,
    "--json",
  ]);
  assert.notEqual(failing.code, 0);
  const failingJob = await daemon.cliJson<{ jobs: BackupJobView[] }>(["backup", "status"]);
  const failedView = failingJob.jobs.find((job) => job.repository === encrypted);
  assert.ok(failedView !== undefined && failedView.state === "failed");
  const failedEvents = await eventsOf(failedView.id);
  const failed = failedEvents.at(-1);
  assert.ok(failed?.type === "failed", JSON.stringify(failedEvents));
  assert.equal(failed.message, failedView.error?.message);
  assert.equal(failed.errno, failedView.error?.errno);
  assert.match(failed.message, /key/i);

  // A restore onto d1 emits its own started (no level; which backup) and finished (bytes written).
  const restore = await daemon.cliJson<BackupJobView>([
    "backup",
    "restore",
    "d0/latest",
    "--repo",
    repository,
    "--device",
    "d1",
    "--detach",
  ]);
  assert.equal((await waitEnded(restore.id)).state, "done");
  const restoreEvents = await eventsOf(restore.id);
  assert.deepEqual(
    restoreEvents.map((event) => event.type),
    ["started", "finished"],
  );
  const [restoreStarted, restoreFinished] = restoreEvents;
  assert.ok(restoreStarted?.type === "started" && restoreFinished?.type === "finished");
  assert.equal(restoreStarted.kind, "restore");
  assert.equal(restoreStarted.level, null);
  assert.match(restoreStarted.reason, /^restore of backup d0\//);
  assert.equal(restoreFinished.bytes, deviceBytes);
  assert.equal(restoreFinished.newBytesStored, 0);

  // Every event is in the daemon's log too; a cursor beyond the newest is not from this daemon run.
  assert.match(daemon.stderr, /"msg":"backup job started"/);
  assert.match(daemon.stderr, /"msg":"backup job failed"/);
  assert.match(daemon.stderr, /"msg":"restore job finished"/);
  const beyond = await daemon.cli(["backup", "events", "--since", "100000"]);
  assert.equal(beyond.code, 1);
  assert.match(beyond.stderr, /beyond the newest event .* of the backup job events/);
});

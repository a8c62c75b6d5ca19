/**
 * Snapshots kept across restarts, with real processes and real clients. d0 holds a taken snapshot whose
 * difference storage is a directory (named files there), d1 has none; qemu-io writes 4 KiB blocks at
 * seeded random offsets on both origins while the daemon is stopped:
 *   - SIGTERM (clean stop): the snapshot comes back with the same id and state, the image reads back
 *     byte-identical to the copy made before take (nbdcopy + cmp, and qemu-img compare);
 *   - SIGKILL at a random moment, six rounds: the same, every round, the CBT generation is unchanged and a
 *     second take (of d1) works;
 *   - a simulated host crash (another boot id, the documented BLOCKSNAP_TEST_BOOT_ID_PATH hook) after
 *     unsealed records: the snapshot comes back corrupted (its image fails with EIO), never with wrong bytes;
 *   - destroy removes the named storage files; a memory: snapshot is reported lost after a restart.
 */
import assert from "node:assert/strict";
import { type ChildProcess, spawn } from "node:child_process";
import { mkdir, mkdtemp, readdir, rm, writeFile } from "node:fs/promises";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { after, before, test } from "node:test";
import type { CbtInfo } from "../../src/cbt/cbt-map.js";
import type { SnapshotView, StatusView } from "../../src/daemon/api-types.js";
import { cleanEnvironment, DaemonProcess } from "../cli/cli-harness.js";
import { missingTools, run, runOk } from "../helpers/commands.js";
import { Prng } from "../helpers/prng.js";

const MiB = 1024 * 1024;
const deviceBytes = 32 * MiB;
const killRounds = 6;
let directory = "";
let daemon: DaemonProcess | undefined;

before(async () => {
  directory = await mkdtemp(join(tmpdir(), "blocksnap-snap-survive-"));
});
after(async () => {
  await daemon?.stop("SIGKILL");
  await rm(directory, { recursive: true, force: true });
});

function start(stateDir: string, bootIdPath: string): Promise<DaemonProcess> {
  return DaemonProcess.start(stateDir, {
    env: cleanEnvironment({ BLOCKSNAP_TEST_BOOT_ID_PATH: bootIdPath }),
  });
}

function uri(current: DaemonProcess, exportName: string): string {
  return `nbd+unix:///${exportName}?socket=${current.nbdSocket}`;
}

/** qemu-io 4 KiB writes at `offsets` on `exportName`; the process is killed by `kill` after killAfterMs. */
function writeUntilKilled(
  current: DaemonProcess,
  exportName: string,
  offsets: readonly number[],
  pattern: number,
): { done: Promise<void>; child: ChildProcess } {
  const commands = offsets.flatMap((offset) => ["-c", `write -P ${pattern} ${offset} 4k`]);
  const child = spawn("qemu-io", ["-f", "raw", uri(current, exportName), ...commands], { stdio: "ignore" });
  return { child, done: new Promise((resolve) => child.once("exit", () => resolve())) };
}

async function imageEquals(
  current: DaemonProcess,
  id: string,
  reference: string,
  round: string,
): Promise<void> {
  const copy = join(directory, "image-copy.img");
  await rm(copy, { force: true });
  await runOk("nbdcopy", [uri(current, `d0@${id}`), copy]);
  const cmp = await run("cmp", [reference, copy]);
  assert.equal(cmp.code, 0, `${round}: the image differs from its content at take: ${cmp.stdout}`);
  const compare = await run("qemu-img", [
    "compare",
    "-f",
    "raw",
    "-F",
    "raw",
    reference,
    uri(current, `d0@${id}`),
  ]);
  assert.equal(compare.code, 0, `${round}: qemu-img compare: ${compare.stdout}${compare.stderr}`);
}

void test("a taken snapshot survives SIGTERM, six kill -9 rounds under writes, and a host crash comes back corrupted", async (t) => {
  const missing = missingTools("qemu-io", "qemu-img", "nbdcopy", "cmp");
  if (missing) return t.skip(missing);
  const stateDir = join(directory, "state");
  const storageDir = join(directory, "storage");
  await mkdir(storageDir);
  const bootIdPath = join(directory, "boot_id");
  await writeFile(bootIdPath, "11111111-2222-3333-4444-555555555555\n");
  daemon = await start(stateDir, bootIdPath);
  for (const name of ["d0", "d1"]) {
    await daemon.cliOk([
      "device",
      "add",
      name,
      "--backend",
      join(directory, `${name}.img`),
      "--size",
      String(deviceBytes),
    ]);
  }
  await runOk("qemu-io", ["-f", "raw", uri(daemon, "d0"), "-c", `write -P 0x5a 0 ${deviceBytes}`]);
  const reference = join(directory, "d0-at-take.img");
  await runOk("nbdcopy", [uri(daemon, "d0"), reference]);
  const id = (
    await daemon.cliOk([
      "snapshot",
      "create",
      "--storage",
      storageDir,
      "--limit",
      "64M",
      "--chunk-size",
      "64K",
      "--device",
      "d0",
    ])
  ).trim();
  await daemon.cliOk(["snapshot", "take", id, "--no-freeze"]);
  const generation = (await daemon.cliJson<CbtInfo>(["cbt", "info", "d0"])).generationId;
  const storageFiles = await readdir(storageDir);
  assert.equal(storageFiles.length, 1, "a directory storage is one named file there");
  assert.match(storageFiles[0]!, new RegExp(`^blocksnap-${id}-0\\.diff$`));

  const prng = Prng.fromEnvironment();
  t.diagnostic(`seed ${prng.seed} (replay with BLOCKSNAP_SEED=${prng.seed})`);
  const offsets = () => Array.from({ length: 400 }, () => prng.int(0, deviceBytes / 4096 - 1) * 4096);

  // A clean stop keeps everything.
  await runOk("qemu-io", [
    "-f",
    "raw",
    uri(daemon, "d0"),
    ...offsets()
      .slice(0, 50)
      .flatMap((o) => ["-c", `write -P 1 ${o} 4k`]),
  ]);
  await daemon.stop("SIGTERM");
  daemon = await start(stateDir, bootIdPath);
  const afterStop = await daemon.cliJson<SnapshotView>(["snapshot", "info", id]);
  assert.equal(afterStop.state, "taken");
  const status = await daemon.cliJson<StatusView>(["status"]);
  assert.equal(status.snapshotRecoveries[0]?.outcome, "restored", JSON.stringify(status.snapshotRecoveries));
  await imageEquals(daemon, id, reference, "after SIGTERM");

  // kill -9 at random moments while both origins take writes.
  for (let round = 1; round <= killRounds; round++) {
    const current = daemon;
    const writers = [
      writeUntilKilled(current, "d0", offsets(), 0x10 + round),
      writeUntilKilled(current, "d1", offsets(), 0x20 + round),
    ];
    await new Promise((resolve) => setTimeout(resolve, prng.int(50, 450)));
    current.child.kill("SIGKILL");
    await current.exited;
    await Promise.all(writers.map((writer) => writer.done));
    daemon = await start(stateDir, bootIdPath);
    const info = await daemon.cliJson<SnapshotView>(["snapshot", "info", id]);
    assert.equal(info.state, "taken", `round ${round}`);
    assert.equal(
      (await daemon.cliJson<CbtInfo>(["cbt", "info", "d0"])).generationId,
      generation,
      `round ${round}`,
    );
    await imageEquals(daemon, id, reference, `kill -9 round ${round}`);
    // A second take works after the restart (on d1, since d0 belongs to the kept snapshot).
    const second = (
      await daemon.cliOk(["snapshot", "create", "--storage", "memory:", "--limit", "8M", "--device", "d1"])
    ).trim();
    await daemon.cliOk(["snapshot", "take", second, "--no-freeze"]);
    assert.equal((await daemon.cliJson<SnapshotView>(["snapshot", "info", second])).state, "taken");
    await daemon.cliOk(["snapshot", "destroy", second]);
  }

  // A host crash after unsealed records: corrupted, never wrong bytes.
  await runOk("qemu-io", [
    "-f",
    "raw",
    uri(daemon, "d0"),
    ...offsets()
      .slice(0, 20)
      .flatMap((o) => ["-c", `write -P 2 ${o} 4k`]),
  ]);
  daemon.child.kill("SIGKILL");
  await daemon.exited;
  await writeFile(bootIdPath, "99999999-2222-3333-4444-555555555555\n");
  daemon = await start(stateDir, bootIdPath);
  const crashed = await daemon.cliJson<SnapshotView>(["snapshot", "info", id]);
  assert.equal(crashed.state, "corrupted");
  const crashedStatus = await daemon.cliJson<StatusView>(["status"]);
  assert.match(crashedStatus.snapshotRecoveries[0]?.reason ?? "", /host crash/);
  const read = await run("qemu-io", ["-f", "raw", uri(daemon, `d0@${id}`), "-c", "read 0 64k"]);
  assert.match(read.stdout + read.stderr, /Input\/output error/);

  await daemon.cliOk(["snapshot", "destroy", id]);
  assert.deepEqual(await readdir(storageDir), [], "destroy removes the named storage file");
  assert.deepEqual(await readdir(join(stateDir, "snapshots")), [], "and the records");
});

void test("a memory: snapshot is reported lost after a restart", async (t) => {
  const missing = missingTools("qemu-io");
  if (missing) return t.skip(missing);
  const stateDir = join(directory, "state-memory");
  const bootIdPath = join(directory, "boot_id_memory");
  await writeFile(bootIdPath, "11111111-2222-3333-4444-555555555555\n");
  let current = await start(stateDir, bootIdPath);
  try {
    await current.cliOk(["device", "add", "m0", "--backend", join(directory, "m0.img"), "--size", "8M"]);
    const id = (
      await current.cliOk(["snapshot", "create", "--storage", "memory:", "--limit", "8M", "--device", "m0"])
    ).trim();
    await current.cliOk(["snapshot", "take", id, "--no-freeze"]);
    await current.stop("SIGTERM");
    current = await start(stateDir, bootIdPath);
    const status = await current.cliJson<StatusView>(["status"]);
    assert.equal(status.snapshots.length, 0);
    assert.equal(status.snapshotRecoveries[0]?.id, id);
    assert.equal(status.snapshotRecoveries[0]?.outcome, "lost");
    assert.match(status.snapshotRecoveries[0]?.reason ?? "", /memory/);
    // The device is free again: a new snapshot of it can be taken.
    const next = (
      await current.cliOk(["snapshot", "create", "--storage", "memory:", "--limit", "8M", "--device", "m0"])
    ).trim();
    await current.cliOk(["snapshot", "take", next, "--no-freeze"]);
  } finally {
    await current.stop("SIGKILL");
  }
});

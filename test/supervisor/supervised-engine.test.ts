/**
 * `serve --supervise` (issue 15): an ext4 mounted on a loop device over a device's FUSE file, a snapshot
 * taken (directory storage), then fio with crc32c verification writing through the file system while the
 * engine is killed with SIGKILL 10 times at random moments or restarted with `blocksnap restart` 10 times.
 * fio must finish without an error and verify every block, the kernel log must show no I/O error for that
 * loop device and no ext4 error, e2fsck -fn must be clean after unmount, the snapshot image must be
 * unchanged byte for byte, and CBT must report every block in which the origin now differs from it.
 * Also: the supervisor gives up on an engine that keeps dying before it is ready, a planned restart keeps
 * the CBT generation, and a killed supervisor leaves no hang and no mount.
 * Root only (FUSE, losetup, mount); skipped with the reason otherwise. Seeded: the seed is printed.
 */
import assert from "node:assert/strict";
import { spawn } from "node:child_process";
import { createHash } from "node:crypto";
import { mkdir, mkdtemp, readFile, rm, symlink, writeFile } from "node:fs/promises";
import { tmpdir } from "node:os";
import { join, resolve } from "node:path";
import { after, before, type TestContext, test } from "node:test";
import type { CbtInfo } from "../../src/cbt/cbt-map.js";
import type { StatusView } from "../../src/daemon/api-types.js";
import { cleanEnvironment, DaemonProcess, runCli } from "../cli/cli-harness.js";
import { isRoot, missingTools, run, runOk } from "../helpers/commands.js";
import { attachLoop, detachLoop } from "../helpers/loop-device.js";
import { Prng } from "../helpers/prng.js";

const MiB = 1024 * 1024;
let directory = "";
const daemons: DaemonProcess[] = [];
const cleanups: (() => Promise<unknown>)[] = [];

before(async () => {
  directory = await mkdtemp(join(tmpdir(), "blocksnap-supervised-"));
});

after(async () => {
  for (const cleanup of cleanups.reverse()) await cleanup().catch(() => {});
  for (const daemon of daemons) await daemon.stop("SIGKILL");
  const mounts = await readFile("/proc/self/mounts", "utf8");
  for (const line of mounts.split("\n").reverse()) {
    const mountPoint = line.split(" ")[1];
    if (mountPoint?.startsWith(`${directory}/`)) await run("umount", ["-l", mountPoint]);
  }
  await rm(directory, { recursive: true, force: true });
});

function skipReason(): string | undefined {
  if (!isRoot) return "needs root (FUSE, losetup, mount)";
  return missingTools("losetup", "mkfs.ext4", "mount", "umount", "e2fsck", "fio", "dmesg");
}

function skipIfUnable(t: TestContext): boolean {
  const reason = skipReason();
  if (reason !== undefined) t.skip(reason);
  return reason !== undefined;
}

async function startSupervised(name: string): Promise<DaemonProcess> {
  const daemon = await DaemonProcess.start(join(directory, name), {
    args: ["--supervise", "--nbd-listen", "none", "--fuse-mount", join(directory, name, "mnt")],
  });
  daemons.push(daemon);
  return daemon;
}

async function enginePid(daemon: DaemonProcess): Promise<number> {
  return (await daemon.cliJson<StatusView>(["status"])).pid;
}

/** The pids of the supervisor's children (the engine, when one runs). */
async function childrenOf(pid: number): Promise<number[]> {
  const text = await readFile(`/proc/${pid}/task/${pid}/children`, "utf8").catch(() => "");
  return text
    .split(" ")
    .filter((word) => word.trim() !== "")
    .map(Number);
}

/** A device with an ext4 on a loop device over its FUSE file, mounted; returns the loop and mount point. */
async function mountedExt4(
  daemon: DaemonProcess,
  name: string,
): Promise<{ loop: string; mountPoint: string; backend: string }> {
  const backend = join(directory, `${name}.img`);
  await runOk("truncate", ["-s", `${256 * MiB}`, backend]);
  await daemon.cliOk(["device", "add", "disk0", "--backend", backend]);
  const loop = await attachLoop(join(daemon.stateDir, "mnt", "disk0"), ["--direct-io=on"]);
  cleanups.push(() => detachLoop(loop));
  await runOk("mkfs.ext4", ["-q", "-F", loop], 60_000);
  const mountPoint = join(directory, `${name}-fs`);
  await mkdir(mountPoint, { recursive: true });
  await runOk("mount", [loop, mountPoint]);
  cleanups.push(() => run("umount", ["-l", mountPoint]));
  return { loop, mountPoint, backend };
}

interface HeldSnapshot {
  readonly id: string;
  readonly imagePath: string;
  readonly takeNumber: number;
  readonly imageDigest: string;
}

/** A snapshot of disk0 on directory storage, taken (the take freezes the mounted ext4). */
async function takeSnapshot(daemon: DaemonProcess, name: string): Promise<HeldSnapshot> {
  const storage = join(directory, `${name}-storage`);
  await mkdir(storage, { recursive: true });
  const id = (
    await daemon.cliOk(["snapshot", "create", "--storage", storage, "--limit", "192M", "--device", "disk0"])
  ).trim();
  await daemon.cliOk(["snapshot", "take", id]);
  const takeNumber = (await daemon.cliJson<CbtInfo>(["cbt", "info", "disk0"])).changesNumber;
  const imagePath = join(daemon.stateDir, "mnt", `disk0@${id}`);
  return { id, imagePath, takeNumber, imageDigest: await digestOf(imagePath) };
}

async function digestOf(path: string): Promise<string> {
  return createHash("sha256")
    .update(await readFile(path))
    .digest("hex");
}

/**
 * The image is still the state at the take, byte for byte, and every CBT block in which the origin now
 * differs from the image is reported changed since that take by the next take (the read map `cbt read`
 * returns is frozen at a take). Destroys the held snapshot.
 */
async function checkSnapshotAndCbt(
  daemon: DaemonProcess,
  held: HeldSnapshot,
  backend: string,
): Promise<void> {
  const image = await readFile(held.imagePath);
  assert.equal(createHash("sha256").update(image).digest("hex"), held.imageDigest, "the image is unchanged");
  const origin = await readFile(backend);
  await daemon.cliOk(["snapshot", "destroy", held.id]);
  const next = (
    await daemon.cliOk(["snapshot", "create", "--storage", "memory:", "--limit", "4M", "--device", "disk0"])
  ).trim();
  await daemon.cliOk(["snapshot", "take", next, "--no-freeze"]);
  await daemon.cliOk(["snapshot", "destroy", next]);
  const info = await daemon.cliJson<CbtInfo>(["cbt", "info", "disk0"]);
  const mapPath = join(directory, `map-${daemon.pid}-${Date.now()}`);
  await daemon.cliOk(["cbt", "read", "disk0", "--out", mapPath]);
  const map = new Uint8Array(await readFile(mapPath));
  let changedBlocks = 0;
  const missed: string[] = [];
  for (let offset = 0; offset < origin.byteLength; offset += info.blockSizeBytes) {
    const end = Math.min(offset + info.blockSizeBytes, origin.byteLength);
    if (Buffer.compare(origin.subarray(offset, end), image.subarray(offset, end)) === 0) continue;
    changedBlocks++;
    const block = offset / info.blockSizeBytes;
    if ((map[block] ?? 0) <= held.takeNumber) missed.push(`${block}:${map[block]}`);
  }
  assert.deepEqual(
    missed,
    [],
    `CBT misses changes (block:number; take ${held.takeNumber}, now ${info.changesNumber}, ${changedBlocks} blocks changed)`,
  );
  assert.ok(changedBlocks > 0, "fio changed the origin after the take");
}

/** fio random writes with crc32c verification of every block, in the background. */
function startFio(mountPoint: string, seconds: number): Promise<{ code: number | null; stdout: string }> {
  return run(
    "fio",
    [
      "--name=verify",
      `--filename=${join(mountPoint, "fio.dat")}`,
      "--size=48M",
      "--rw=randwrite",
      "--bs=4k",
      "--ioengine=libaio",
      "--iodepth=16",
      "--direct=1",
      "--verify=crc32c",
      "--do_verify=1",
      "--verify_fatal=1",
      "--verify_state_save=0",
      "--time_based",
      `--runtime=${seconds}`,
    ],
    { timeoutMs: (seconds + 120) * 1000 },
  ).then((result) => ({ code: result.code, stdout: result.stdout + result.stderr }));
}

async function kernelLogLines(): Promise<string[]> {
  return (await runOk("dmesg", [])).split("\n");
}

/** The kernel's complaints about `loop` since `before`: I/O errors and ext4 errors. */
function kernelErrors(before: readonly string[], now: readonly string[], loop: string): string[] {
  const device = loop.replace("/dev/", "");
  const seen = new Set(before);
  return now.filter(
    (line) =>
      !seen.has(line) &&
      (line.includes(`I/O error, dev ${device},`) ||
        line.includes(`Buffer I/O error on dev ${device}`) ||
        line.includes(`EXT4-fs error (device ${device})`) ||
        line.includes(`Aborting journal on device ${device}`)),
  );
}

async function unmountAndCheck(loop: string, mountPoint: string): Promise<void> {
  await runOk("umount", [mountPoint]);
  const fsck = await run("e2fsck", ["-fn", loop], { timeoutMs: 120_000 });
  assert.equal(fsck.code, 0, `e2fsck -fn after the restarts:\n${fsck.stdout}${fsck.stderr}`);
}

void test("kill -9 of the engine 10 times under fio on ext4 over FUSE: fio verifies, no I/O error, fsck clean", async (t) => {
  if (skipIfUnable(t)) return;
  const daemon = await startSupervised("kill");
  const { loop, mountPoint, backend } = await mountedExt4(daemon, "kill");
  const held = await takeSnapshot(daemon, "kill");
  const random = Prng.fromEnvironment();
  t.diagnostic(`seed ${random.seed} (replay with BLOCKSNAP_SEED=${random.seed})`);
  const kernelBefore = await kernelLogLines();
  const fio = startFio(mountPoint, 20);
  const killed: number[] = [];
  for (let round = 0; round < 10; round++) {
    await new Promise((resolve) => setTimeout(resolve, random.int(300, 1500)));
    // The engine, not the standby the supervisor keeps loaded: the pid status reports.
    const status = await daemon.cli(["status", "--json"]);
    if (status.code !== 0) continue;
    const engine = (JSON.parse(status.stdout) as StatusView).pid;
    process.kill(engine, "SIGKILL");
    killed.push(engine);
  }
  const result = await fio;
  assert.equal(result.code, 0, `fio failed after ${killed.length} engine kills:\n${result.stdout}`);
  assert.match(result.stdout, /err= 0/);
  assert.ok(killed.length >= 5, `only ${killed.length} engines were running to be killed`);
  const status = await daemon.cliJson<StatusView>(["status"]);
  assert.ok(status.supervisor !== undefined, "status shows the supervisor");
  assert.equal(status.supervisor.pid, daemon.pid);
  assert.ok(!killed.includes(status.pid), "a new engine serves");
  assert.ok(status.supervisor.restarts.length >= killed.length - 1, "status counts the restarts");
  assert.match(status.supervisor.restarts.at(-1)?.cause ?? "", /SIGKILL/);
  assert.deepEqual(kernelErrors(kernelBefore, await kernelLogLines(), loop), []);
  await unmountAndCheck(loop, mountPoint);
  await checkSnapshotAndCbt(daemon, held, backend);
  assert.deepEqual((await daemon.stop("SIGTERM")).code, 0);
});

void test("blocksnap restart 10 times under fio: no failed request, the CBT generation is kept, status shows the engine", async (t) => {
  if (skipIfUnable(t)) return;
  const daemon = await startSupervised("planned");
  const { loop, mountPoint, backend } = await mountedExt4(daemon, "planned");
  const held = await takeSnapshot(daemon, "planned");
  const generation = (await daemon.cliJson<CbtInfo>(["cbt", "info", "disk0"])).generationId;
  const kernelBefore = await kernelLogLines();
  const fio = startFio(mountPoint, 16);
  let pid = await enginePid(daemon);
  for (let round = 0; round < 10; round++) {
    await new Promise((resolve) => setTimeout(resolve, 800));
    const restarted = await daemon.cliJson<{ previousPid: number; pid: number }>(["restart"]);
    assert.equal(restarted.previousPid, pid);
    assert.notEqual(restarted.pid, pid);
    pid = restarted.pid;
  }
  const result = await fio;
  assert.equal(result.code, 0, `fio failed across planned restarts:\n${result.stdout}`);
  assert.deepEqual(kernelErrors(kernelBefore, await kernelLogLines(), loop), []);
  const status = await daemon.cliJson<StatusView>(["status"]);
  assert.equal(status.supervisor?.engineNumber, 11);
  assert.deepEqual(status.supervisor?.restarts, [], "planned restarts are not deaths");
  const cbt = await daemon.cliJson<CbtInfo>(["cbt", "info", "disk0"]);
  assert.equal(cbt.generationId, generation, "a planned restart keeps the CBT generation");
  await unmountAndCheck(loop, mountPoint);
  await checkSnapshotAndCbt(daemon, held, backend);
  assert.deepEqual((await daemon.stop("SIGTERM")).code, 0);
  await assert.rejects(readFile(join(daemon.stateDir, "blocksnap.sock")), /ENOENT/);
});

void test("restart is refused without a supervisor, and while a memory: snapshot exists unless --force; other snapshots are kept", async (t) => {
  if (skipIfUnable(t)) return;
  const plain = await DaemonProcess.start(join(directory, "plain"));
  daemons.push(plain);
  const refused = await plain.cli(["restart"]);
  assert.equal(refused.code, 1);
  assert.match(refused.stderr, /serve --supervise/);
  await plain.stop();

  const daemon = await startSupervised("busy");
  await daemon.cliOk(["device", "add", "m0", "--backend", "memory:", "--size", `${4 * MiB}`]);
  await daemon.cliOk([
    "snapshot",
    "create",
    "--device",
    "m0",
    "--storage",
    "memory:",
    "--limit",
    `${4 * MiB}`,
  ]);
  const busy = await daemon.cli(["restart"]);
  assert.equal(busy.code, 1);
  assert.match(busy.stderr, /EBUSY|snapshot/);
  const forced = await daemon.cliJson<{ pid: number }>(["restart", "--force"]);
  assert.notEqual(forced.pid, 0);
  assert.equal((await daemon.cliJson<StatusView>(["status"])).snapshots.length, 0);

  // A snapshot on a directory storage is kept: the restart is not refused and the snapshot comes back.
  await daemon.cliOk([
    "device",
    "add",
    "f0",
    "--backend",
    join(directory, "busy-f0.img"),
    "--size",
    `${4 * MiB}`,
  ]);
  const kept = (
    await daemon.cliOk([
      "snapshot",
      "create",
      "--device",
      "f0",
      "--storage",
      directory,
      "--limit",
      `${4 * MiB}`,
    ])
  ).trim();
  await daemon.cliOk(["snapshot", "take", kept, "--no-freeze"]);
  await daemon.cliJson<{ pid: number }>(["restart"]);
  const after = await daemon.cliJson<StatusView>(["status"]);
  assert.deepEqual(
    after.snapshots.map((snapshot) => [snapshot.id, snapshot.state]),
    [[kept, "taken"]],
  );
  await daemon.cliOk(["snapshot", "destroy", kept]);
  await daemon.stop();
});

void test("an engine that keeps dying before it is ready: the supervisor gives up, says why, and cleans up", async (t) => {
  if (skipIfUnable(t)) return;
  const daemon = await startSupervised("crashloop");
  // From now on every engine is killed as soon as it appears, before it can become ready.
  let stopKilling = false;
  const killer = (async () => {
    while (!stopKilling) {
      for (const pid of await childrenOf(daemon.pid)) {
        try {
          process.kill(pid, "SIGKILL");
        } catch {
          // Already gone.
        }
      }
      await new Promise((resolve) => setTimeout(resolve, 2));
    }
  })();
  const exited = await Promise.race([
    daemon.exited,
    new Promise<null>((resolve) => setTimeout(() => resolve(null), 60_000)),
  ]);
  stopKilling = true;
  await killer;
  assert.ok(exited !== null, "the supervisor gave up within a minute");
  assert.equal(exited.code, 1);
  assert.match(daemon.stderr, /giving up: \d+ engines in a row died before they were ready/);
  await assert.rejects(readFile(join(daemon.stateDir, "blocksnap.sock")), /ENOENT/);
  const mounts = await readFile("/proc/self/mounts", "utf8");
  assert.ok(!mounts.includes(join(daemon.stateDir, "mnt")), "the FUSE mount is gone");
});

void test("an upgrade: a new version installed in place, blocksnap restart, and the daemon reports it", async () => {
  // An installation of our own to upgrade: the compiled tree, its package.json and the dependencies.
  const install = join(directory, "install");
  await mkdir(install, { recursive: true });
  await runOk("cp", ["-r", resolve("dist"), join(install, "dist")]);
  const packageJson = JSON.parse(await readFile(resolve("package.json"), "utf8")) as { version: string };
  await writeFile(join(install, "package.json"), JSON.stringify(packageJson));
  await symlink(resolve("node_modules"), join(install, "node_modules"));
  const stateDir = join(directory, "upgrade");
  const supervisor = spawn(
    process.execPath,
    [
      join(install, "dist/src/cli/main.js"),
      "serve",
      "--supervise",
      "--state-dir",
      stateDir,
      "--nbd-listen",
      "none",
      "--fuse-mount",
      "none",
    ],
    { stdio: ["ignore", "ignore", "pipe"], env: cleanEnvironment() },
  );
  const exited = new Promise((resolve) => supervisor.once("exit", resolve));
  try {
    const status = async (): Promise<StatusView | null> => {
      const result = await runCli(["status", "--json", "--state-dir", stateDir]);
      return result.code === 0 ? (JSON.parse(result.stdout) as StatusView) : null;
    };
    let before: StatusView | null = null;
    for (let attempt = 0; attempt < 100 && before === null; attempt++) {
      before = await status();
      if (before === null) await new Promise((wake) => setTimeout(wake, 100));
    }
    assert.ok(before !== null, "the supervised daemon answered");
    assert.equal(before.version, packageJson.version);
    await writeFile(
      join(install, "package.json"),
      JSON.stringify({ ...packageJson, version: "9.9.9-upgraded" }),
    );
    const restarted = await runCli(["restart", "--json", "--state-dir", stateDir]);
    assert.equal(restarted.code, 0, restarted.stderr);
    const after = JSON.parse(restarted.stdout) as { pid: number; version: string };
    assert.equal(after.version, "9.9.9-upgraded");
    assert.notEqual(after.pid, before.pid);
    assert.equal((await status())?.supervisor?.pid, supervisor.pid);
  } finally {
    supervisor.kill("SIGTERM");
    await exited;
  }
});

void test("a killed supervisor: the engine stops by itself and leaves no mount", async (t) => {
  if (skipIfUnable(t)) return;
  const daemon = await startSupervised("orphan");
  const engine = await enginePid(daemon);
  await daemon.stop("SIGKILL");
  let alive = true;
  for (let attempt = 0; attempt < 200 && alive; attempt++) {
    await new Promise((resolve) => setTimeout(resolve, 50));
    try {
      process.kill(engine, 0);
    } catch {
      alive = false;
    }
  }
  assert.equal(alive, false, "the orphaned engine stopped");
  const mounts = await readFile("/proc/self/mounts", "utf8");
  assert.ok(!mounts.includes(join(daemon.stateDir, "mnt")), "the FUSE mount is gone");
});

/**
 * Backups in an S3 repository on a real OpenStack Swift with s3api (issue 14), through the real daemon and
 * CLI: full and incremental backups of an ext4 device (root: mkfs.ext4 and files on a loop device over the
 * device's FUSE file; otherwise qemu-io patterns over NBD), each restored and compared with `cmp` against
 * the device as it was, the restored ext4 checked with fsck and its files read back; prune + GC; verify
 * that catches a deleted and a corrupted object; wrong credentials and a missing bucket as one clear line.
 *
 * Swift is started by the test (swift-server.ts). As root (CI) a Swift that cannot start fails the file;
 * as another user it skips with the reason.
 */
import assert from "node:assert/strict";
import { spawn } from "node:child_process";
import { randomBytes } from "node:crypto";
import { copyFile, mkdir, mkdtemp, readFile, rm, writeFile } from "node:fs/promises";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { after, before, type TestContext, test } from "node:test";
import { collectGarbage } from "../../src/backup/prune.js";
import { Repository } from "../../src/backup/repository.js";
import { S3Store } from "../../src/backup/s3-store.js";
import type { DeviceView } from "../../src/daemon/api-types.js";
import type { BackupJobView } from "../../src/daemon/backup-jobs.js";
import { cleanEnvironment, cliPath, DaemonProcess, runCli } from "../cli/cli-harness.js";
import { isRoot, missingTools, run, runOk, which } from "../helpers/commands.js";
import { attachLoop, detachLoop } from "../helpers/loop-device.js";
import { backupJson } from "./backup-helpers.js";
import { S3FaultProxy } from "./s3-fault-proxy.js";
import { SwiftServer, swiftSkipReason } from "./swift-server.js";

const MiB = 1024 * 1024;
const bucket = "blocksnap-test";
let directory = "";
let swift: SwiftServer | null = null;
let swiftSkip = "";
const daemons: DaemonProcess[] = [];
const cleanups: (() => Promise<unknown>)[] = [];

before(async () => {
  directory = await mkdtemp(join(tmpdir(), "blocksnap-s3-"));
  try {
    swift = await SwiftServer.start();
  } catch (error) {
    swiftSkip = swiftSkipReason(error);
    return;
  }
  await adminStore("").createBucket();
});

after(async () => {
  for (const cleanup of cleanups.reverse()) await cleanup().catch(() => undefined);
  // SIGTERM: the daemon unmounts its FUSE directory; a lazy unmount covers one that could not.
  for (const daemon of daemons) {
    await daemon.stop("SIGTERM");
    await run("umount", ["-l", join(daemon.stateDir, "mnt")]);
  }
  await swift?.stop();
  await rm(directory, { recursive: true, force: true });
});

function requireSwift(t: TestContext): SwiftServer | null {
  if (swift === null) {
    t.skip(swiftSkip);
    return null;
  }
  return swift;
}

/** A store of the test itself, to look at and damage objects behind the repository's back. */
function adminStore(prefix: string, bucketName = bucket): S3Store {
  assert.ok(swift !== null);
  return new S3Store({
    bucket: bucketName,
    prefix,
    endpoint: swift.endpoint,
    region: swift.region,
    credentials: { accessKeyId: swift.accessKeyId, secretAccessKey: swift.secretAccessKey },
  });
}

/** The environment of one "host": its credentials (and later its cache directory). */
function hostEnvironment(name: string, secret?: string): NodeJS.ProcessEnv {
  assert.ok(swift !== null);
  return cleanEnvironment({
    AWS_ACCESS_KEY_ID: swift.accessKeyId,
    AWS_SECRET_ACCESS_KEY: secret ?? swift.secretAccessKey,
    AWS_SHARED_CREDENTIALS_FILE: join(directory, `${name}-no-credentials-file`),
    XDG_CACHE_HOME: join(directory, `${name}-cache`),
  });
}

function s3Args(swiftServer: SwiftServer, prefix: string): string[] {
  return ["--repo", `s3://${bucket}/${prefix}`, "--s3-endpoint", swiftServer.endpoint];
}

interface Host {
  readonly daemon: DaemonProcess;
  readonly env: NodeJS.ProcessEnv;
  cli(args: readonly string[]): ReturnType<typeof runCli>;
  cliOk(args: readonly string[]): Promise<string>;
  cliJson<T>(args: readonly string[]): Promise<T>;
}

async function startHost(name: string, options: { fuse: boolean }): Promise<Host> {
  const env = hostEnvironment(name);
  const daemon = await DaemonProcess.start(join(directory, name), {
    env,
    args: options.fuse ? ["--nbd-listen", "none"] : ["--fuse-mount", "none"],
  });
  daemons.push(daemon);
  const cli = (args: readonly string[]) => runCli([...args, "--state-dir", daemon.stateDir], { env });
  return {
    daemon,
    env,
    cli,
    async cliOk(args) {
      const result = await cli(args);
      assert.equal(result.code, 0, `blocksnap ${args.join(" ")} failed: ${result.stderr}`);
      return result.stdout;
    },
    async cliJson<T>(args: readonly string[]) {
      const result = await cli([...args, "--json"]);
      assert.equal(result.code, 0, `blocksnap ${args.join(" ")} failed: ${result.stderr}`);
      return JSON.parse(result.stdout) as T;
    },
  };
}

async function sameBytes(a: string, b: string): Promise<void> {
  const cmp = await run("cmp", [a, b]);
  assert.equal(cmp.code, 0, `cmp ${a} ${b}: ${cmp.stdout}${cmp.stderr}`);
}

/**
 * A device whose contents change in steps: ext4 with files on a loop device over its FUSE file when root,
 * qemu-io patterns over NBD otherwise. `change(step)` makes step `step`'s changes and leaves the file
 * system unmounted (so the backup's snapshot holds a clean ext4); `check(image, step)` checks a restored
 * image holds what step `step` wrote.
 */
interface ChangingDevice {
  readonly backend: string;
  change(step: number): Promise<void>;
  check(image: string, step: number): Promise<void>;
}

async function ext4Device(host: Host, name: string): Promise<ChangingDevice> {
  const backend = join(directory, `${name}.img`);
  await runOk("truncate", ["-s", String(48 * MiB), backend]);
  const device = await host.cliJson<DeviceView>(["device", "add", "d0", "--backend", backend]);
  assert.ok(device.fusePath !== null, "the device has a FUSE file");
  const loop = await attachLoop(device.fusePath);
  cleanups.push(() => detachLoop(loop));
  await runOk("mkfs.ext4", ["-q", "-F", "-E", "lazy_itable_init=0,lazy_journal_init=0", loop], 60_000);
  const mountPoint = join(directory, `${name}-mnt`);
  await mkdir(mountPoint);
  const fileText = (step: number, index: number) => `step ${step} file ${index}\n`.repeat(20_000);
  return {
    backend,
    async change(step) {
      await runOk("mount", [loop, mountPoint]);
      try {
        for (let index = 0; index < (step === 1 ? 6 : 2); index++)
          await writeFile(join(mountPoint, `file-${step}-${index}.txt`), fileText(step, index));
        await writeFile(join(mountPoint, "changing.txt"), fileText(step, 99));
      } finally {
        await runOk("umount", [mountPoint]);
      }
    },
    async check(image, step) {
      const fsck = await run("fsck.ext4", ["-n", "-f", image]);
      assert.equal(fsck.code, 0, `fsck of ${image}: ${fsck.stdout}${fsck.stderr}`);
      const restoredMount = join(directory, `${name}-restored-${step}`);
      await mkdir(restoredMount, { recursive: true });
      await runOk("mount", ["-o", "ro,loop", image, restoredMount]);
      try {
        assert.equal(await readFile(join(restoredMount, "changing.txt"), "utf8"), fileText(step, 99));
        assert.equal(await readFile(join(restoredMount, `file-${step}-1.txt`), "utf8"), fileText(step, 1));
      } finally {
        await runOk("umount", [restoredMount]);
      }
    },
  };
}

async function patternDevice(host: Host, name: string): Promise<ChangingDevice> {
  const backend = join(directory, `${name}.img`);
  await runOk("truncate", ["-s", String(48 * MiB), backend]);
  await host.cliOk(["device", "add", "d0", "--backend", backend]);
  const uri = `nbd+unix:///d0?socket=${host.daemon.nbdSocket}`;
  return {
    backend,
    async change(step) {
      const writes =
        step === 1
          ? ["write -P 1 0 1M", "write -P 2 5M 3M", "write -P 3 20M 64k"]
          : [`write -P ${10 + step} 7M 4k`, `write -P ${20 + step} 30M 512`];
      await runOk("qemu-io", ["-f", "raw", uri, ...writes.flatMap((write) => ["-c", write])]);
    },
    async check() {
      // The byte comparison with the device as it was is the whole check for patterns.
    },
  };
}

function chunkKeys(store: S3Store): Promise<string[]> {
  return (async () => {
    const keys: string[] = [];
    for await (const object of store.list("chunks/")) keys.push(object.key);
    return keys.sort();
  })();
}

void test("full and incremental backups of a device to Swift restore byte for byte; prune, GC, verify", async (t) => {
  const server = requireSwift(t);
  if (server === null) return;
  t.diagnostic(`Swift started healthy in ${Math.round(server.startMs)} ms`);
  const useExt4 = isRoot && missingTools("losetup", "mkfs.ext4", "fsck.ext4", "mount") === undefined;
  if (!useExt4 && !which("qemu-io")) return t.skip("needs root (ext4 on a loop device) or qemu-io");
  const host = await startHost("host-a", { fuse: useExt4 });
  const device = useExt4 ? await ext4Device(host, "a0") : await patternDevice(host, "a0");
  const repo = s3Args(server, "single");
  await host.cliOk(["backup", "init", ...repo, "--chunk-size", "256K"]);

  await device.change(1);
  const full = await backupJson<BackupJobView>(host, ["backup", "run", "d0", ...repo]);
  assert.equal(full.state, "done");
  assert.equal(full.result?.level, "full");
  const afterFull = join(directory, "a0-after-full.img");
  await copyFile(device.backend, afterFull);

  await device.change(2);
  const inc = await backupJson<BackupJobView>(host, ["backup", "run", "d0", ...repo]);
  assert.equal(inc.result?.level, "inc", inc.levelReason ?? "");
  assert.ok((inc.result?.readBytes ?? 0) < 48 * MiB, "the incremental read less than the device");

  const restoredLatest = join(directory, "a0-latest.img");
  await host.cliOk(["backup", "restore", "d0/latest", ...repo, "--to", restoredLatest]);
  await sameBytes(restoredLatest, device.backend);
  await device.check(restoredLatest, 2);
  const restoredFull = join(directory, "a0-full.img");
  await host.cliOk(["backup", "restore", `d0/${full.backupId}`, ...repo, "--to", restoredFull]);
  await sameBytes(restoredFull, afterFull);

  // Instant restore from S3: `backup mount` serves the full backup over NBD; nbdcopy reads it as it was.
  if (which("nbdcopy")) {
    const socket = join(directory, "a0-mount.sock");
    const mount = spawn(
      process.execPath,
      [cliPath, "backup", "mount", `d0/${full.backupId}`, ...repo, "--nbd-socket", socket],
      { env: host.env, stdio: ["ignore", "pipe", "pipe"] },
    );
    let mountOutput = "";
    mount.stdout.setEncoding("utf8").on("data", (text: string) => {
      mountOutput += text;
    });
    mount.stderr.setEncoding("utf8").on("data", (text: string) => {
      mountOutput += text;
    });
    const mountExited = new Promise<number | null>((resolve) => mount.once("exit", (code) => resolve(code)));
    try {
      for (let attempt = 0; attempt < 600 && !mountOutput.includes("serving"); attempt++) {
        await new Promise((resolve) => setTimeout(resolve, 50));
      }
      assert.match(mountOutput, /serving d0\//);
      const mountedCopy = join(directory, "a0-mounted.img");
      await runOk("nbdcopy", [`nbd+unix:///d0?socket=${socket}`, mountedCopy]);
      await sameBytes(mountedCopy, afterFull);
    } finally {
      mount.kill("SIGTERM");
    }
    assert.equal(await mountExited, 0, mountOutput);
  }
  await device.check(restoredFull, 1);

  const listed = await host.cliJson<{ backups: { id: string; level: string }[] }>([
    "backup",
    "list",
    ...repo,
  ]);
  assert.deepEqual(
    listed.backups.map((backup) => [backup.id, backup.level]),
    [
      [full.backupId, "full"],
      [inc.backupId, "inc"],
    ],
  );
  const verified = await host.cli(["backup", "verify", ...repo]);
  assert.equal(verified.code, 0, verified.stdout + verified.stderr);

  // Prune to the newest backup; GC with no grace removes what only the full named; the rest restores.
  const store = adminStore("single/");
  const chunksBefore = (await chunkKeys(store)).length;
  const pruned = await host.cliJson<{ removed: string[]; removedChunks: number }>([
    "backup",
    "prune",
    ...repo,
    "--keep-last",
    "1",
    "--grace-hours",
    "0",
  ]);
  assert.deepEqual(pruned.removed, [`d0/${full.backupId}`]);
  assert.equal((await chunkKeys(store)).length, chunksBefore - pruned.removedChunks);
  const restoredAfterPrune = join(directory, "a0-after-prune.img");
  await host.cliOk(["backup", "restore", "d0/latest", ...repo, "--to", restoredAfterPrune]);
  await sameBytes(restoredAfterPrune, device.backend);

  // Damage behind the repository's back: one chunk deleted, another with a flipped byte.
  const [deleted, corrupted] = await chunkKeys(store);
  assert.ok(deleted !== undefined && corrupted !== undefined, "at least two chunks stored");
  await store.delete(deleted);
  const bytes = Buffer.from(await store.get(corrupted));
  bytes[bytes.length - 1] = (bytes[bytes.length - 1] ?? 0) ^ 0xff;
  await store.put(corrupted, bytes);
  const broken = await host.cli(["backup", "verify", ...repo]);
  assert.equal(broken.code, 1, broken.stdout + broken.stderr);
  const idOf = (key: string) => key.slice(key.lastIndexOf("/") + 1, key.lastIndexOf("/") + 13);
  assert.match(broken.stdout, new RegExp(`${idOf(deleted)}.*missing`));
  assert.match(broken.stdout, new RegExp(idOf(corrupted)));
  const failedRestore = await host.cli([
    "backup",
    "restore",
    "d0/latest",
    ...repo,
    "--to",
    join(directory, "a0-broken.img"),
  ]);
  assert.notEqual(failedRestore.code, 0, "a restore that needs a damaged chunk fails");
});

void test("wrong credentials and a missing bucket are one clear line each", async (t) => {
  const server = requireSwift(t);
  if (server === null) return;
  const goodEnv = hostEnvironment("creds");
  const repo = s3Args(server, "creds");
  const init = await runCli(["backup", "init", ...repo], { env: goodEnv });
  assert.equal(init.code, 0, init.stderr);

  const wrongSecret = await runCli(["backup", "list", ...repo], {
    env: hostEnvironment("creds", "not-the-secret"),
  });
  assert.notEqual(wrongSecret.code, 0);
  assert.match(wrongSecret.stderr, /S3 rejected the credentials/);
  assert.equal(wrongSecret.stderr.trim().split("\n").length, 1, wrongSecret.stderr);

  const wrongUser = await runCli(["backup", "list", ...repo], {
    env: { ...goodEnv, AWS_ACCESS_KEY_ID: "nobody:nobody" },
  });
  assert.notEqual(wrongUser.code, 0);
  assert.match(wrongUser.stderr, /S3 (rejected the credentials|denied)/);
  assert.equal(wrongUser.stderr.trim().split("\n").length, 1, wrongUser.stderr);

  const noCredentials = await runCli(["backup", "list", ...repo], {
    env: { ...goodEnv, AWS_ACCESS_KEY_ID: "", AWS_SECRET_ACCESS_KEY: "" },
  });
  assert.notEqual(noCredentials.code, 0);
  assert.match(noCredentials.stderr, /No S3 credentials/);

  for (const command of [
    ["backup", "list"],
    ["backup", "init"],
  ]) {
    const missing = await runCli(
      [...command, "--repo", "s3://no-such-bucket/x", "--s3-endpoint", server.endpoint],
      { env: goodEnv },
    );
    assert.notEqual(missing.code, 0);
    assert.match(missing.stderr, /bucket no-such-bucket does not exist/);
    assert.equal(missing.stderr.trim().split("\n").length, 1, missing.stderr);
  }
  const badName = await runCli(["backup", "list", "--repo", "s3://A_B/x"], { env: goodEnv });
  assert.notEqual(badName.code, 0);
  assert.match(badName.stderr, /Invalid S3 bucket name/);
});

void test("the chunk index: existence checks cost no request; rebuilt after GC, after a missing chunk, when absent", async (t) => {
  const server = requireSwift(t);
  if (server === null) return;
  const indexDirectory = join(directory, "index-cache");
  const store = adminStore("index/");
  const repository = await Repository.init(store, { chunkIndexDirectory: indexDirectory, codecWorkers: 1 });
  const ids: string[] = [];
  try {
    for (let index = 0; index < 12; index++) {
      const { id, stored } = await repository.codec.encode(randomBytes(64 << 10));
      assert.ok(stored !== null);
      assert.equal(await repository.hasChunk(id), false);
      await repository.putChunk(id, stored);
      ids.push(id);
    }
    const headsBefore = store.stats.byKind.HEAD ?? 0;
    for (const id of ids) assert.equal(await repository.hasChunk(id), true);
    assert.equal(store.stats.byKind.HEAD ?? 0, headsBefore, "no HEAD per chunk");
    assert.equal(repository.chunkIndex?.stats?.reason, "no local index yet");
  } finally {
    await repository.close();
  }

  const openAgain = async () => {
    const fresh = adminStore("index/");
    const reopened = await Repository.open(fresh, { chunkIndexDirectory: indexDirectory, codecWorkers: 1 });
    await reopened.hasChunk(ids[0] ?? "");
    return { reopened, fresh };
  };
  let { reopened, fresh } = await openAgain();
  assert.equal(reopened.chunkIndex?.stats?.source, "file");
  assert.equal(reopened.chunkIndex?.stats?.ids, ids.length);
  assert.equal(fresh.stats.byKind.LIST ?? 0, 0, "a fresh index is trusted without a listing");
  // GC (no manifest names these chunks, no grace): the marker changes and the next open rebuilds.
  const garbage = await collectGarbage(reopened, { graceMs: 0, nowMs: Date.now() + 5_000 });
  assert.equal(garbage.removedChunks, ids.length);
  await reopened.close();
  ({ reopened, fresh } = await openAgain());
  assert.equal(reopened.chunkIndex?.stats?.source, "rebuilt");
  assert.match(reopened.chunkIndex?.stats?.reason ?? "", /garbage collection ran/);
  assert.equal(await reopened.hasChunk(ids[0] ?? ""), false);
  // A chunk deleted by hand: the read that finds it missing drops the index; the next open rebuilds.
  const { id, stored } = await reopened.codec.encode(randomBytes(64 << 10));
  assert.ok(stored !== null);
  await reopened.putChunk(id, stored);
  await fresh.delete(Repository.chunkKey(id));
  await assert.rejects(reopened.readChunk(id), /missing/);
  await reopened.close();
  ({ reopened } = await openAgain());
  assert.equal(reopened.chunkIndex?.stats?.reason, "no local index yet");
  assert.equal(await reopened.hasChunk(id), false);
  await reopened.close();
});

/** A device whose backend holds `data` before the daemon serves it (full backups only read it). */
async function deviceWith(host: Host, name: string, data: Buffer): Promise<string> {
  const backend = join(directory, `${name}.img`);
  await writeFile(backend, data);
  await host.cliOk(["device", "add", name, "--backend", backend]);
  return backend;
}

void test("throttling (503 SlowDown) and connection resets from a proxy: the backup and restore retry through", async (t) => {
  const server = requireSwift(t);
  if (server === null) return;
  const proxy = await S3FaultProxy.start(server.endpoint);
  cleanups.push(() => proxy.stop());
  proxy.plan = {
    slowDown: (number) => number % 3 === 0,
    reset: (number) => number % 7 === 0 && number % 3 !== 0,
  };
  const host = await startHost("throttled", { fuse: false });
  const backend = await deviceWith(host, "t0", randomBytes(4 * MiB));
  const repo = ["--repo", `s3://${bucket}/throttled`, "--s3-endpoint", proxy.endpoint];
  await host.cliOk(["backup", "init", ...repo, "--chunk-size", "256K"]);
  const done = await backupJson<BackupJobView>(host, ["backup", "run", "t0", ...repo]);
  assert.equal(done.state, "done", JSON.stringify(done.error));
  const restored = join(directory, "t0-restored.img");
  await host.cliOk(["backup", "restore", "t0/latest", ...repo, "--to", restored]);
  await sameBytes(restored, backend);
  const verified = await host.cli(["backup", "verify", ...repo]);
  assert.equal(verified.code, 0, verified.stdout + verified.stderr);
  t.diagnostic(`proxy: ${JSON.stringify(proxy.counts)}`);
  assert.ok(proxy.counts.slowDowns > 5 && proxy.counts.resets > 2, JSON.stringify(proxy.counts));
});

void test("Swift restarted in the middle of a backup: the job finishes by retrying, or fails cleanly and the next run completes", async (t) => {
  const server = requireSwift(t);
  if (server === null) return;
  const proxy = await S3FaultProxy.start(server.endpoint);
  cleanups.push(() => proxy.stop());
  let restart: Promise<void> | null = null;
  proxy.onChunkPut = {
    afterChunkPuts: 8,
    action: () => {
      restart = server.restart();
    },
  };
  const host = await startHost("restarted", { fuse: false });
  const backend = await deviceWith(host, "r0", randomBytes(8 * MiB));
  const repo = ["--repo", `s3://${bucket}/restarted`, "--s3-endpoint", proxy.endpoint];
  await host.cliOk(["backup", "init", ...repo, "--chunk-size", "256K"]);
  const first = await host.cli(["backup", "run", "r0", ...repo, "--json"]);
  assert.ok(restart !== null, "Swift was restarted during the backup");
  await restart;
  t.diagnostic(`first run exit ${first.code}; proxy ${JSON.stringify(proxy.counts)}`);
  if (first.code !== 0) {
    assert.match(first.stderr, /S3 /, "a failure names S3");
    assert.equal(first.stderr.trim().split("\n").length, 1, first.stderr);
    const verified = await host.cli(["backup", "verify", ...repo]);
    assert.equal(verified.code, 0, verified.stdout + verified.stderr);
    const second = await backupJson<BackupJobView>(host, ["backup", "run", "r0", ...repo]);
    assert.equal(second.state, "done");
  }
  assert.ok(proxy.counts.upstreamFailures > 0, "requests met the stopped Swift");
  const restored = join(directory, "r0-restored.img");
  await host.cliOk(["backup", "restore", "r0/latest", ...repo, "--to", restored]);
  await sameBytes(restored, backend);
});

void test("two hosts (two daemons) back up into one shared repository at once, prune runs beside them, each restores the other's", async (t) => {
  const server = requireSwift(t);
  if (server === null) return;
  const shared = randomBytes(4 * MiB);
  const hostA = await startHost("fleet-a", { fuse: false });
  const hostB = await startHost("fleet-b", { fuse: false });
  const backendA = await deviceWith(hostA, "a-d0", Buffer.concat([randomBytes(4 * MiB), shared]));
  const backendB = await deviceWith(hostB, "b-d0", Buffer.concat([shared, randomBytes(4 * MiB)]));
  const repo = s3Args(server, "fleet");
  await hostA.cliOk(["backup", "init", ...repo, "--chunk-size", "256K"]);
  const earlier = await backupJson<BackupJobView>(hostA, ["backup", "run", "a-d0", ...repo]);
  assert.equal(earlier.state, "done");
  const second = await backupJson<BackupJobView>(hostA, ["backup", "run", "a-d0", ...repo]);
  assert.equal(second.state, "done");

  const [runA, runB, prune] = await Promise.all([
    backupJson<BackupJobView>(hostA, ["backup", "run", "a-d0", ...repo]),
    backupJson<BackupJobView>(hostB, ["backup", "run", "b-d0", ...repo]),
    hostB.cliJson<{ removed: string[] }>(["backup", "prune", ...repo, "--keep-last", "1"]),
  ]);
  assert.equal(runA.state, "done");
  assert.equal(runB.state, "done");
  // Prune kept the newest backup of a-d0 it saw (the second, or the one running beside it) and removed the
  // first; the running backups' chunks are young, inside the grace period, so GC left them alone.
  assert.ok(prune.removed.includes(`a-d0/${earlier.backupId}`), JSON.stringify(prune.removed));

  const aOnB = join(directory, "a-on-b.img");
  const bOnA = join(directory, "b-on-a.img");
  await Promise.all([
    hostB.cliOk(["backup", "restore", "a-d0/latest", ...repo, "--to", aOnB]),
    hostA.cliOk(["backup", "restore", "b-d0/latest", ...repo, "--to", bOnA]),
  ]);
  await sameBytes(aOnB, backendA);
  await sameBytes(bOnA, backendB);
  const verified = await hostB.cli(["backup", "verify", ...repo]);
  assert.equal(verified.code, 0, verified.stdout + verified.stderr);
  // 16 unique chunks per host and 16 shared ones (256 KiB each), each stored once.
  assert.equal((await chunkKeys(adminStore("fleet/"))).length, 48);
});

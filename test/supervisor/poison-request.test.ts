/**
 * A broken invariant inside a FUSE request of a supervised engine (issue 15): the engine records the request
 * and aborts without answering it, the kernel resends it to the next engine (FUSE_NOTIFY_RESEND). A bug
 * that strikes once is then invisible to the writer (dd succeeds, its data is on the backend); a request
 * that breaks an invariant every time is answered EIO by the third engine, after two deaths, and the daemon
 * serves on. The failure is made by the test hook BLOCKSNAP_TEST_FUSE_WRITE_ASSERT (poison-request.ts).
 * Root only (FUSE); skipped with the reason otherwise.
 */
import assert from "node:assert/strict";
import { randomBytes } from "node:crypto";
import { existsSync } from "node:fs";
import { mkdtemp, open, readFile, rm, writeFile } from "node:fs/promises";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { after, test } from "node:test";
import type { StatusView } from "../../src/daemon/api-types.js";
import { cleanEnvironment, DaemonProcess } from "../cli/cli-harness.js";
import { isRoot, missingTools, run, runOk } from "../helpers/commands.js";

const MiB = 1024 * 1024;
const cleanups: Array<() => Promise<unknown>> = [];

after(async () => {
  for (const cleanup of cleanups.reverse()) await cleanup().catch(() => {});
});

async function restartCount(daemon: DaemonProcess): Promise<number> {
  const status = await daemon.cliJson<StatusView>(["status"]);
  return status.supervisor?.restarts.length ?? 0;
}

async function backendBlock(path: string, offsetBytes: number, lengthBytes: number): Promise<Buffer> {
  const handle = await open(path, "r");
  try {
    const target = Buffer.alloc(lengthBytes);
    await handle.read(target, 0, lengthBytes, offsetBytes);
    return target;
  } finally {
    await handle.close();
  }
}

void test("a broken invariant in a FUSE write under --supervise: resent to the next engine once, answered EIO after two deaths", async (t) => {
  if (!isRoot) return t.skip("needs root (FUSE)");
  const missing = missingTools("dd");
  if (missing) return t.skip(missing);
  const directory = await mkdtemp(join(tmpdir(), "blocksnap-poison-"));
  cleanups.push(() => rm(directory, { recursive: true, force: true }));
  const hook = join(directory, "assert-hook");
  const mountDir = join(directory, "mnt");
  const daemon = await DaemonProcess.start(join(directory, "state"), {
    args: ["--supervise", "--nbd-listen", "none", "--fuse-mount", mountDir],
    env: { ...cleanEnvironment(), BLOCKSNAP_TEST_FUSE_WRITE_ASSERT: hook },
  });
  cleanups.push(() => daemon.stop("SIGKILL"));
  const backend = join(directory, "d0.img");
  await runOk("truncate", ["-s", String(16 * MiB), backend]);
  const added = await daemon.cliJson<{ fusePath: string | null }>([
    "device",
    "add",
    "d0",
    "--backend",
    backend,
  ]);
  assert.ok(added.fusePath !== null);
  const pattern = join(directory, "pattern");
  const data = randomBytes(4096);
  await writeFile(pattern, data);
  const ddBlock = (seekBlocks: number) =>
    run("dd", [
      `if=${pattern}`,
      `of=${added.fusePath}`,
      "bs=4096",
      "count=1",
      `seek=${seekBlocks}`,
      "oflag=direct",
      "conv=notrunc,fsync",
    ]);

  // Once: the dying engine leaves the request unanswered; the next one runs it; dd never notices.
  const before = await restartCount(daemon);
  await writeFile(hook, "once");
  const once = await ddBlock(10);
  assert.equal(once.code, 0, `dd through a one-time broken invariant: ${once.stderr}`);
  assert.equal(existsSync(hook), false, "the hook fired");
  assert.equal(await restartCount(daemon), before + 1, "one engine died");
  assert.match(daemon.stderr, /left unanswered for the next engine/);
  assert.deepEqual(
    await backendBlock(backend, 10 * 4096, 4096),
    data,
    "the resent write reached the backend",
  );

  // Every time: two engines die on it, the third answers EIO without running it and serves on.
  await writeFile(hook, "always");
  const always = await ddBlock(20);
  assert.notEqual(always.code, 0, "dd gets the error once the request killed two engines");
  assert.match(always.stderr, /Input\/output error/);
  assert.equal(await restartCount(daemon), before + 3, "two more engines died, no more");
  assert.match(daemon.stderr, /broke an invariant in every engine that ran it: answered EIO/);
  await rm(hook);
  const afterwards = await ddBlock(30);
  assert.equal(afterwards.code, 0, `the daemon serves on: ${afterwards.stderr}`);
  assert.deepEqual(await backendBlock(backend, 30 * 4096, 4096), data);
  const poison = join(daemon.stateDir, "fuse-session.json.poison");
  assert.equal(existsSync(poison), false, "no record is left once the request was answered");
  assert.ok((await readFile("/proc/self/mounts", "utf8")).includes(mountDir), "the mount is still there");
});

/**
 * One rule for broken invariants, proven per face: a device (or engine) below the face fails an assertion;
 * the request in hand is answered EIO (NBD through qemu-io, FUSE through dd, the control API as 500 EIO),
 * the error is logged at error level with its stack, and then the process ends with a non-zero status.
 * Each face runs in its own child (invariant-child.ts), since ending is the point.
 */
import assert from "node:assert/strict";
import { type ChildProcess, spawn } from "node:child_process";
import { mkdir, mkdtemp, rm } from "node:fs/promises";
import { request } from "node:http";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { test } from "node:test";
import { fileURLToPath } from "node:url";
import { blocksnapMountsAt } from "../../src/fuse/fuse-mount.js";
import { skipReason } from "../fuse/fuse-fixture.js";
import { missingTools, run } from "../helpers/commands.js";

const childScript = fileURLToPath(new URL("./invariant-child.js", import.meta.url));
const exitTimeoutMs = 20_000;

interface Child {
  readonly process: ChildProcess;
  readonly stderr: () => string;
  /** How the child ended, or null when it had to be killed after exitTimeoutMs. */
  readonly exited: Promise<{ code: number | null; signal: string | null } | null>;
}

async function startChild(face: string, path: string): Promise<Child> {
  // No core file from the abort: the shell sets the child's core limit to 0.
  const child = spawn(
    "sh",
    ["-c", 'ulimit -c 0; exec "$0" "$@"', process.execPath, childScript, face, path],
    {
      stdio: ["ignore", "pipe", "pipe"],
    },
  );
  let stdout = "";
  let stderr = "";
  child.stderr.on("data", (chunk: Buffer) => {
    stderr += chunk.toString("utf8");
  });
  const exited = new Promise<{ code: number | null; signal: string | null } | null>((resolve) => {
    const timer = setTimeout(() => {
      child.kill("SIGKILL");
      resolve(null);
    }, exitTimeoutMs);
    child.once("exit", (code, signal) => {
      clearTimeout(timer);
      resolve({ code, signal });
    });
  });
  await new Promise<void>((resolve, reject) => {
    child.stdout.on("data", (chunk: Buffer) => {
      stdout += chunk.toString("utf8");
      if (stdout.includes("ready\n")) resolve();
    });
    exited.then((how) => reject(new Error(`child ended (${JSON.stringify(how)}) before ready: ${stderr}`)));
  });
  return { process: child, stderr: () => stderr, exited };
}

/** The child aborted on its own after logging the broken invariant at error level with a stack. */
async function assertEndedByInvariant(child: Child, message: RegExp): Promise<void> {
  const how = await child.exited;
  assert.ok(how, `the child did not end within ${exitTimeoutMs} ms:\n${child.stderr()}`);
  assert.equal(how.signal, "SIGABRT", `a broken invariant aborts the process: ${JSON.stringify(how)}`);
  assert.match(child.stderr(), /blocksnap: broken invariant in .*; aborting\nAssertionError/);
  const logged = child
    .stderr()
    .split("\n")
    .filter((line) => line.startsWith("{"))
    .map((line) => JSON.parse(line) as { level: string; msg?: string; err?: string; stack?: string });
  const entry = logged.find((line) => line.level === "error" && /broken invariant/.test(line.msg ?? ""));
  assert.ok(entry, `no error-level broken-invariant log line:\n${child.stderr()}`);
  assert.match(entry.err ?? "", message);
  assert.match(entry.stack ?? "", /AssertionError/);
}

test("NBD: an assertion below the face is answered EIO, logged, and ends the process", async (t) => {
  const skip = missingTools("qemu-io");
  if (skip) return t.skip(skip);
  const directory = await mkdtemp(join(tmpdir(), "blocksnap-invariant-nbd-"));
  t.after(() => rm(directory, { recursive: true, force: true }));
  const socketPath = join(directory, "nbd.sock");
  const child = await startChild("nbd", socketPath);
  t.after(() => child.process.kill("SIGKILL"));
  const uri = `nbd+unix:///disk?socket=${socketPath}`;
  const fine = await run("qemu-io", ["-f", "raw", uri, "-c", "read 0 4k"]);
  assert.doesNotMatch(fine.stdout + fine.stderr, /failed/, "a read below the broken offset works");
  const broken = await run("qemu-io", ["-f", "raw", uri, "-c", "read 128k 4k"]);
  assert.match(broken.stdout + broken.stderr, /Input\/output error/);
  await assertEndedByInvariant(child, /no read beyond 64 KiB/);
});

test("FUSE: an assertion below the face is answered EIO, logged, and ends the process", async (t) => {
  const skip = (await skipReason(["dd"])) ?? missingTools("dd");
  if (skip) return t.skip(skip);
  const directory = await mkdtemp(join(tmpdir(), "blocksnap-invariant-fuse-"));
  const mountDir = join(directory, "mnt");
  await mkdir(mountDir);
  t.after(async () => {
    for (const _mount of await blocksnapMountsAt(mountDir)) await run("umount", ["-l", mountDir]);
    await rm(directory, { recursive: true, force: true });
  });
  const child = await startChild("fuse", mountDir);
  t.after(() => child.process.kill("SIGKILL"));
  const file = join(mountDir, "disk");
  const fine = await run("dd", [`if=${file}`, "of=/dev/null", "bs=4096", "count=1", "iflag=direct"]);
  assert.equal(fine.code, 0, fine.stderr);
  const broken = await run("dd", [
    `if=${file}`,
    "of=/dev/null",
    "bs=4096",
    "skip=32",
    "count=1",
    "iflag=direct",
  ]);
  assert.notEqual(broken.code, 0);
  assert.match(broken.stderr, /Input\/output error/);
  await assertEndedByInvariant(child, /no read beyond 64 KiB/);
});

test("control API: an assertion in the engine is answered 500 EIO, logged, and ends the process", async (t) => {
  const directory = await mkdtemp(join(tmpdir(), "blocksnap-invariant-control-"));
  t.after(() => rm(directory, { recursive: true, force: true }));
  const socketPath = join(directory, "control.sock");
  const child = await startChild("control", socketPath);
  t.after(() => child.process.kill("SIGKILL"));
  const answer = await new Promise<{ status: number; body: string }>((resolve, reject) => {
    const outgoing = request({ socketPath, path: "/v1/devices", method: "GET" }, (response) => {
      let body = "";
      response.on("data", (chunk: Buffer) => {
        body += chunk.toString("utf8");
      });
      response.on("end", () => resolve({ status: response.statusCode ?? 0, body }));
      response.on("error", reject);
    });
    outgoing.on("error", reject);
    outgoing.end();
  });
  assert.equal(answer.status, 500);
  assert.equal((JSON.parse(answer.body) as { error: { errno: string } }).error.errno, "EIO");
  await assertEndedByInvariant(child, /the device list is broken/);
});

// Exports that come and go under a mounted blocksnap FUSE file system, and a server that crashes: what
// ls, stat, dd, mount, umount and losetup see. Everything that touches the mount runs in a child process.
import assert from "node:assert/strict";
import { type ChildProcess, spawn } from "node:child_process";
import { randomBytes } from "node:crypto";
import { mkdtemp, rm, writeFile } from "node:fs/promises";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { test } from "node:test";
import { fileURLToPath } from "node:url";
import { MemoryBackend } from "../../src/backends/memory-backend.js";
import { CheckedDevice } from "../../src/block/checked-device.js";
import { StaticExportSource } from "../../src/block/export-source.js";
import { blocksnapMountsAt } from "../../src/fuse/fuse-mount.js";
import { cleanStaleMount, FuseServer } from "../../src/fuse/fuse-server.js";
import { FuseFixture, must, run, skipReason } from "./fuse-fixture.js";

const MiB = 1024 * 1024;
const snapshotName = "disk0@6f1c2a8e-3b1d-4c55-9e0f-0123456789ab";

async function listing(directory: string): Promise<string[]> {
  return (await must("ls", ["-1", directory])).split("\n").filter((line) => line.length > 0);
}

/** "inode size octal-mode" of a file, via stat(1) in a child. */
async function statOf(path: string): Promise<{ inode: number; sizeBytes: number; mode: string }> {
  const [inode, size, mode] = (await must("stat", ["-c", "%i %s %a", path])).trim().split(" ");
  return { inode: Number(inode), sizeBytes: Number(size), mode: mode ?? "" };
}

/** Resolves with the child's stdout so far once `line` appears in it; rejects if it exits first. */
function waitForLine(child: ChildProcess, line: string): Promise<void> {
  return new Promise((resolve, reject) => {
    let output = "";
    const onData = (chunk: Buffer) => {
      output += chunk.toString();
      if (output.split("\n").includes(line)) {
        child.stdout?.off("data", onData);
        resolve();
      }
    };
    child.stdout?.on("data", onData);
    child.once("exit", (code) =>
      reject(new Error(`child exited (${code}) before printing ${line}: ${output}`)),
    );
  });
}

function exitOf(child: ChildProcess): Promise<number | null> {
  if (child.exitCode !== null || child.signalCode !== null) return Promise.resolve(child.exitCode);
  return new Promise((resolve) => child.once("exit", (code) => resolve(code)));
}

test("the directory lists exports as they appear and vanish, with stable inodes, sizes and modes", async (t) => {
  const fixture = await FuseFixture.create(t, ["ls", "stat"]);
  if (!fixture) return;
  fixture.addMemoryExport("disk0", 3 * MiB);
  assert.deepEqual(await listing(fixture.mountDir), ["disk0"]);
  const first = await statOf(fixture.filePath("disk0"));
  assert.deepEqual({ sizeBytes: first.sizeBytes, mode: first.mode }, { sizeBytes: 3 * MiB, mode: "600" });

  fixture.addMemoryExport(snapshotName, 3 * MiB, true);
  fixture.addMemoryExport("disk1", MiB);
  assert.deepEqual(await listing(fixture.mountDir), ["disk0", snapshotName, "disk1"]);
  assert.equal((await statOf(fixture.filePath(snapshotName))).mode, "400", "read-only exports are 0400");
  assert.equal(
    (await statOf(fixture.filePath("disk0"))).inode,
    first.inode,
    "inode stable while the export lives",
  );

  fixture.source.remove("disk1");
  assert.deepEqual(await listing(fixture.mountDir), ["disk0", snapshotName]);
  const gone = await run("stat", [fixture.filePath("disk1")]);
  assert.notEqual(gone.exitCode, 0);
  assert.match(gone.stderr, /No such file or directory/);

  fixture.source.remove("disk0");
  fixture.addMemoryExport("disk0", 2 * MiB);
  const again = await statOf(fixture.filePath("disk0"));
  assert.notEqual(again.inode, first.inode, "a new export under an old name is a new inode");
  assert.equal(again.sizeBytes, 2 * MiB);
});

test("an export removed while a mounted file system on its loop device is read: I/O errors, umount -l and losetup -d work, other files keep serving", async (t) => {
  const fixture = await FuseFixture.create(t, ["mkfs.ext4", "dd", "cmp", "sh"]);
  if (!fixture) return;
  fixture.addMemoryExport("victim", 64 * MiB);
  const survivor = fixture.addMemoryExport("survivor", 8 * MiB);
  const survivorData = randomBytes(8 * MiB);
  await survivor.write(0, survivorData);
  const reference = join(fixture.directory, "survivor.bin");
  await writeFile(reference, survivorData);

  const loop = await fixture.attachLoop("victim");
  await must("mkfs.ext4", ["-q", "-F", loop]);
  const target = await fixture.mountFs(loop, "fs");
  await must("dd", [
    "if=/dev/urandom",
    `of=${join(target, "big")}`,
    "bs=1M",
    "count=16",
    "conv=fsync",
    "status=none",
  ]);

  const readerScript = [
    "i=0",
    "while [ $i -lt 50 ]; do",
    '  dd if="$1" of=/dev/null bs=1M iflag=direct status=none || { echo failed; exit 3; }',
    "  echo pass; i=$((i + 1))",
    "done",
  ].join("\n");
  const reader = spawn("sh", ["-c", readerScript, "reader", join(target, "big")], {
    stdio: ["ignore", "pipe", "pipe"],
    env: { ...process.env, LC_ALL: "C" },
  });
  let readerErrors = "";
  reader.stderr.on("data", (chunk: Buffer) => {
    readerErrors += chunk.toString();
  });
  t.after(() => {
    if (reader.exitCode === null) reader.kill("SIGKILL");
  });
  await waitForLine(reader, "pass");

  fixture.source.remove("victim");
  assert.equal(await exitOf(reader), 3, "the reader must fail instead of reading on or hanging");
  assert.match(readerErrors, /Input\/output error/);

  assert.equal((await run("umount", ["-l", target])).exitCode, 0, "umount -l of the broken file system");
  fixture.forgetFs(target);
  await fixture.detachLoop(loop);

  const lookup = await run("stat", [fixture.filePath("victim")]);
  assert.match(lookup.stderr, /No such file or directory/);
  const check = await run("sh", [
    "-c",
    'dd if="$1" bs=1M iflag=direct status=none | cmp - "$2"',
    "cmp",
    fixture.filePath("survivor"),
    reference,
  ]);
  assert.equal(
    check.exitCode,
    0,
    `the other export must keep serving its data: ${check.stdout}${check.stderr}`,
  );
});

test("a crashed server's stale mount is detected and removed, and the directory can be served again", async (t) => {
  const reason = await skipReason(["stat", "ls"]);
  if (reason) {
    t.skip(reason);
    return;
  }
  const directory = await mkdtemp(join(tmpdir(), "blocksnap-fuse-stale-"));
  const mountDir = join(directory, "mnt");
  let server: FuseServer | undefined;
  t.after(async () => {
    await server?.unmount();
    for (const _mount of await blocksnapMountsAt(mountDir)) await run("umount", ["-l", mountDir]);
    await rm(directory, { recursive: true, force: true });
  });

  const script = fileURLToPath(new URL("./fuse-child-server.js", import.meta.url));
  const child = spawn(process.execPath, [script, mountDir, `crashed:${MiB}`], {
    stdio: ["ignore", "pipe", "inherit"],
  });
  await waitForLine(child, "ready");
  assert.deepEqual(await listing(mountDir), ["crashed"]);
  child.kill("SIGKILL");
  await exitOf(child);

  const dead = await run("stat", [mountDir]);
  assert.match(dead.stderr, /Transport endpoint is not connected/, "a crashed server leaves a dead mount");
  assert.equal((await blocksnapMountsAt(mountDir)).length, 1);
  assert.equal(await cleanStaleMount(mountDir), true);
  assert.equal((await blocksnapMountsAt(mountDir)).length, 0);
  assert.equal(await cleanStaleMount(mountDir), false, "nothing left to clean");

  const source = new StaticExportSource();
  server = await FuseServer.mount(source, { mountDir });
  source.add({
    name: "fresh",
    description: "",
    device: new CheckedDevice(new MemoryBackend(MiB)),
    readOnly: false,
  });
  assert.deepEqual(await listing(mountDir), ["fresh"]);
  assert.equal(await cleanStaleMount(mountDir), false, "a live mount is left alone");
  assert.equal((await blocksnapMountsAt(mountDir)).length, 1);
  await assert.rejects(FuseServer.mount(source, { mountDir }), /already served/);
});

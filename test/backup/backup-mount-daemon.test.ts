/**
 * Instant restore through the daemon: `blocksnap backup mount` makes the daemon serve a backup as the
 * export `<device>@backup-<id>` over NBD and as a FUSE file. Proven with clients nobody on this project
 * wrote: nbdcopy + cmp against the device at backup time; losetup + mount of the ext4 in it through the
 * FUSE file with a writable overlay, a file written there, e2fsck clean; the repository's files unchanged
 * byte for byte and `backup verify` passing; a read-only mount refusing qemu-io's write; `backup unmount`
 * taking the export away (nbdinfo --list, the FUSE file).
 */
import assert from "node:assert/strict";
import { createHash } from "node:crypto";
import { existsSync } from "node:fs";
import { mkdir, mkdtemp, readdir, readFile, rm, writeFile } from "node:fs/promises";
import { tmpdir } from "node:os";
import { join, relative } from "node:path";
import { after, test } from "node:test";
import type { BackupJobView } from "../../src/daemon/backup-jobs.js";
import { DaemonProcess } from "../cli/cli-harness.js";
import { isRoot, missingTools, run, runOk } from "../helpers/commands.js";
import { attachLoop, detachLoop, detachLoopOk } from "../helpers/loop-device.js";
import { backupJson } from "./backup-helpers.js";

const MiB = 1024 * 1024;
const cleanups: Array<() => Promise<unknown>> = [];

after(async () => {
  for (const cleanup of cleanups.reverse()) await cleanup().catch(() => {});
});

interface MountedView {
  readonly name: string;
  readonly backup: string;
  readonly readOnly: boolean;
  readonly nbdUris: readonly string[];
  readonly fusePath: string | null;
}

/** Every file of the repository with the SHA-256 of its content. */
async function repositoryDigest(root: string): Promise<Map<string, string>> {
  const digest = new Map<string, string>();
  const walk = async (directory: string): Promise<void> => {
    for (const entry of await readdir(directory, { withFileTypes: true })) {
      const path = join(directory, entry.name);
      if (entry.isDirectory()) await walk(path);
      else
        digest.set(
          relative(root, path),
          createHash("sha256")
            .update(await readFile(path))
            .digest("hex"),
        );
    }
  };
  await walk(root);
  return digest;
}

void test("backup mount through the daemon: NBD and a FUSE file, a writable overlay that leaves the repository unchanged, unmount", async (t) => {
  if (!isRoot) return t.skip("needs root (FUSE, losetup, mount)");
  const missing = missingTools("mkfs.ext4", "e2fsck", "losetup", "nbdcopy", "nbdinfo", "qemu-io", "cmp");
  if (missing) return t.skip(missing);
  const directory = await mkdtemp(join(tmpdir(), "blocksnap-backup-mount-daemon-"));
  cleanups.push(() => rm(directory, { recursive: true, force: true }));

  // An ext4 with a known file, made offline, as the device's content.
  const content = join(directory, "content");
  await mkdir(content);
  const payload = Buffer.alloc(300 * 1024, "backed up\n");
  await writeFile(join(content, "hello.txt"), payload);
  const backend = join(directory, "d0.img");
  await runOk("truncate", ["-s", String(32 * MiB), backend]);
  await runOk("mkfs.ext4", ["-q", "-F", "-d", content, backend]);

  // Pushed first, so it runs last: a daemon stopped with SIGKILL leaves its FUSE mount behind.
  cleanups.push(() => run("umount", ["-l", join(directory, "state", "mnt")]));
  const daemon = await DaemonProcess.start(join(directory, "state"), { args: [] });
  cleanups.push(() => daemon.stop("SIGKILL"));
  await daemon.cliOk(["device", "add", "d0", "--backend", backend]);
  const repository = join(directory, "repo");
  await daemon.cliOk(["backup", "init", "--repo", repository, "--chunk-size", "64K"]);
  const job = await backupJson<BackupJobView>(daemon, ["backup", "run", "d0", "--repo", repository]);
  assert.equal(job.state, "done");
  const repositoryBefore = await repositoryDigest(repository);

  const mounted = await daemon.cliJson<MountedView>([
    "backup",
    "mount",
    "d0/latest",
    "--repo",
    repository,
    "--overlay",
  ]);
  assert.equal(mounted.name, `d0@backup-${job.backupId}`);
  assert.equal(mounted.readOnly, false);
  const uri = mounted.nbdUris[0];
  assert.ok(uri, "served over NBD");
  assert.ok(mounted.fusePath !== null && existsSync(mounted.fusePath), "served as a FUSE file");

  const copy = join(directory, "copy.img");
  await runOk("nbdcopy", [uri, copy]);
  const same = await run("cmp", [backend, copy]);
  assert.equal(same.code, 0, `the mounted backup differs from the device: ${same.stdout}`);

  const loop = await attachLoop(mounted.fusePath);
  cleanups.push(() => detachLoop(loop));
  const mountPoint = join(directory, "mnt");
  await mkdir(mountPoint);
  await runOk("mount", [loop, mountPoint]);
  cleanups.push(() => run("umount", [mountPoint]));
  assert.deepEqual(await readFile(join(mountPoint, "hello.txt")), payload, "the file as backed up");
  await writeFile(join(mountPoint, "written-after.txt"), "into the overlay\n");
  await runOk("umount", [mountPoint]);
  const fsck = await run("e2fsck", ["-fn", loop]);
  assert.equal(fsck.code, 0, `e2fsck on the overlay: ${fsck.stdout}${fsck.stderr}`);
  await detachLoopOk(loop);

  const changed = await run("cmp", ["-s", backend, await copyOf(uri, join(directory, "after.img"))]);
  assert.notEqual(changed.code, 0, "the overlay holds the writes");
  assert.deepEqual(await repositoryDigest(repository), repositoryBefore, "the repository is unchanged");
  await daemon.cliOk(["backup", "verify", "--repo", repository]);

  await daemon.cliOk(["backup", "unmount", mounted.name]);
  const listed = await runOk("nbdinfo", ["--list", "--json", `nbd+unix:///?socket=${daemon.nbdSocket}`]);
  assert.ok(!listed.includes(mounted.name), "the export is gone after unmount");
  assert.equal(existsSync(mounted.fusePath), false, "the FUSE file is gone after unmount");

  // Read-only without --overlay: writes refused; `backup mounts` lists it.
  const readOnly = await daemon.cliJson<MountedView>([
    "backup",
    "mount",
    job.backupId ?? "",
    "--repo",
    repository,
  ]);
  assert.equal(readOnly.readOnly, true);
  const write = await run("qemu-io", ["-f", "raw", readOnly.nbdUris[0] ?? "", "-c", "write -P 3 0 4k"]);
  assert.notEqual(write.code, 0, "a write to a read-only mounted backup is refused");
  const mounts = await daemon.cliJson<{ mounts: MountedView[] }>(["backup", "mounts"]);
  assert.deepEqual(
    mounts.mounts.map((mount) => mount.name),
    [readOnly.name],
  );
  const again = await daemon.cli(["backup", "mount", "d0/latest", "--repo", repository]);
  assert.notEqual(again.code, 0, "the same backup cannot be mounted twice");
  assert.match(again.stderr, /already mounted/);
  await daemon.cliOk(["backup", "unmount", readOnly.name]);
  const unknown = await daemon.cli(["backup", "unmount", readOnly.name]);
  assert.notEqual(unknown.code, 0);
  assert.match(unknown.stderr, /No mounted backup/);
});

async function copyOf(uri: string, path: string): Promise<string> {
  await runOk("nbdcopy", [uri, path]);
  return path;
}

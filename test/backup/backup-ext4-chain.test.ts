/**
 * A chain of backups of a live, mounted ext4 into a local repository (issue 13, "How it is tested"): ext4 on
 * a loop device over a device's FUSE file stays mounted and written throughout; at each step a snapshot is
 * taken (the take freezes the file system), its image copied with nbdcopy, then backed up from that snapshot
 * (full, then incrementals). Each backup restores to a file equal to its image byte for byte, fsck-clean, and
 * holding the files as they were at that take — not the writes made after it. Then one chunk only the last
 * backup uses is damaged: verify names that backup and the offset, its restore fails loudly and leaves no
 * image, and the earlier backups still restore. Root only (FUSE, losetup, mount); skipped with the reason
 * otherwise.
 */
import assert from "node:assert/strict";
import { createHash } from "node:crypto";
import { mkdir, mkdtemp, readdir, readFile, rm, stat, unlink, writeFile } from "node:fs/promises";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { after, before, type TestContext, test } from "node:test";
import { DirectoryStore } from "../../src/backup/directory-store.js";
import { Repository } from "../../src/backup/repository.js";
import type { BackupJobView } from "../../src/daemon/backup-jobs.js";
import { DaemonProcess } from "../cli/cli-harness.js";
import { isRoot, missingTools, run, runOk } from "../helpers/commands.js";
import { attachLoop, detachLoop } from "../helpers/loop-device.js";
import { Prng } from "../helpers/prng.js";
import { backupJson } from "./backup-helpers.js";

const MiB = 1024 * 1024;
let directory = "";
let daemon: DaemonProcess | null = null;
/** Undone in reverse order in `after`. */
const cleanups: (() => Promise<unknown>)[] = [];

before(async () => {
  directory = await mkdtemp(join(tmpdir(), "blocksnap-backup-ext4-chain-"));
});
after(async () => {
  for (const cleanup of cleanups.reverse()) await cleanup().catch(() => {});
  // SIGTERM: the daemon unmounts its FUSE directory on the way out (a killed one would leave it mounted).
  await daemon?.stop("SIGTERM");
  await rm(directory, { recursive: true, force: true });
});

function skipReason(): string | undefined {
  if (!isRoot) return "needs root (FUSE, losetup, mount)";
  return missingTools("losetup", "mkfs.ext4", "e2fsck", "mount", "umount", "nbdcopy", "cmp");
}

/** File name → SHA-256 of every regular file at the top of `mountPoint` (lost+found aside). */
async function digestsOf(mountPoint: string): Promise<Map<string, string>> {
  const digests = new Map<string, string>();
  for (const name of (await readdir(mountPoint)).sort()) {
    if (name === "lost+found") continue;
    digests.set(
      name,
      createHash("sha256")
        .update(await readFile(join(mountPoint, name)))
        .digest("hex"),
    );
  }
  return digests;
}

/** Step `step`'s changes: new files, one rewritten, one deleted (the first step only writes). */
async function changeFiles(mountPoint: string, step: number, prng: Prng): Promise<void> {
  const content = () =>
    Buffer.from(
      Array.from({ length: MiB / 4 }, () => prng.next() >>> 0).flatMap((word) => [
        word & 0xff,
        (word >>> 8) & 0xff,
        (word >>> 16) & 0xff,
        word >>> 24,
      ]),
    );
  const newFiles = step === 1 ? 6 : 2;
  for (let index = 0; index < newFiles; index++)
    await writeFile(join(mountPoint, `s${step}-f${index}.bin`), content());
  if (step > 1) {
    await writeFile(join(mountPoint, "s1-f0.bin"), content());
    await unlink(join(mountPoint, `s1-f${step}.bin`));
  }
}

async function sameBytes(a: string, b: string): Promise<void> {
  const cmp = await run("cmp", [a, b]);
  assert.equal(cmp.code, 0, `cmp ${a} ${b}: ${cmp.stdout}${cmp.stderr}`);
}

/** fsck -fn, then a read-only mount of `image`; returns its files' digests. */
async function filesOfImage(image: string, label: string): Promise<Map<string, string>> {
  const fsck = await run("e2fsck", ["-fn", image]);
  assert.equal(fsck.code, 0, `e2fsck -fn ${image}: ${fsck.stdout}${fsck.stderr}`);
  const mountPoint = join(directory, label);
  await mkdir(mountPoint);
  await runOk("mount", ["-o", "ro,loop", image, mountPoint]);
  try {
    return await digestsOf(mountPoint);
  } finally {
    await runOk("umount", [mountPoint]);
  }
}

void test("backups of a mounted ext4: each restores to its take's image and files; a damaged chunk is named and fails only its backup", async (t: TestContext) => {
  const skip = skipReason();
  if (skip) return t.skip(skip);
  const prng = new Prng(0x13_0e_c4);
  // The default options (args: []): NBD on the state directory's socket and FUSE files under it.
  daemon = await DaemonProcess.start(join(directory, "state"), { args: [] });
  const running = daemon;
  const backend = join(directory, "d0.img");
  await runOk("truncate", ["-s", String(64 * MiB), backend]);
  const device = await running.cliJson<{ fusePath: string | null }>([
    "device",
    "add",
    "d0",
    "--backend",
    backend,
  ]);
  assert.ok(device.fusePath !== null, "the device has a FUSE file");
  const loop = await attachLoop(device.fusePath);
  cleanups.push(() => detachLoop(loop));
  await runOk("mkfs.ext4", ["-q", "-F", "-E", "lazy_itable_init=0,lazy_journal_init=0", loop], 60_000);
  const mountPoint = join(directory, "live");
  await mkdir(mountPoint);
  await runOk("mount", [loop, mountPoint]);
  cleanups.push(() => run("umount", ["-l", mountPoint]));

  const repository = join(directory, "repo");
  await running.cliOk(["backup", "init", "--repo", repository, "--chunk-size", "1M"]);
  const steps: { backupId: string; image: string; files: Map<string, string> }[] = [];
  for (let step = 1; step <= 3; step++) {
    await changeFiles(mountPoint, step, prng);
    const files = await digestsOf(mountPoint);
    const snapshot = (
      await running.cliOk(["snapshot", "create", "--storage", "memory:", "--limit", "64M", "--device", "d0"])
    ).trim();
    await running.cliOk(["snapshot", "take", snapshot]);
    // Written after the take: in no backup of this step.
    await writeFile(join(mountPoint, `after-take-${step}.txt`), `written after take ${step}\n`);
    const image = join(directory, `image-${step}.img`);
    await runOk("nbdcopy", [`nbd+unix:///d0@${snapshot}?socket=${running.nbdSocket}`, image]);
    const job = await backupJson<BackupJobView>(running, [
      "backup",
      "create",
      "--repo",
      repository,
      "--device",
      "d0",
      "--snapshot",
      snapshot,
    ]);
    assert.equal(job.state, "done");
    assert.equal(job.result?.level, step === 1 ? "full" : "inc", job.levelReason ?? "");
    if (step > 1)
      assert.ok(
        (job.result?.readBytes ?? Number.POSITIVE_INFINITY) < 32 * MiB,
        `the incremental read only what changed: ${job.result?.readBytes} bytes`,
      );
    await running.cliOk(["snapshot", "destroy", snapshot]);
    assert.ok(job.backupId);
    steps.push({ backupId: job.backupId, image, files });
  }

  for (const [index, { backupId, image, files }] of steps.entries()) {
    const restored = join(directory, `restored-${index + 1}.img`);
    await running.cliOk(["backup", "restore", `d0/${backupId}`, "--repo", repository, "--to", restored]);
    await sameBytes(restored, image);
    assert.deepEqual(
      await filesOfImage(restored, `restored-${index + 1}`),
      files,
      `backup ${index + 1}'s files`,
    );
  }

  // Damage one chunk that only the last backup names.
  const store = await Repository.open(new DirectoryStore(repository));
  const manifests = [];
  try {
    for (const { backupId } of steps)
      manifests.push(await store.readManifest({ device: "d0", id: backupId }));
  } finally {
    await store.close();
  }
  const [first, second, last] = manifests;
  assert.ok(first && second && last);
  const earlier = new Set([...first.chunks, ...second.chunks]);
  const slot = last.chunks.findIndex((id) => id !== null && !earlier.has(id));
  assert.ok(slot >= 0, "the last backup stored a chunk of its own");
  const victimId = last.chunks[slot] ?? "";
  const victim = join(repository, "chunks", victimId.slice(0, 2), victimId);
  const bytes = await readFile(victim);
  bytes[bytes.length >> 1] = (bytes[bytes.length >> 1] ?? 0) ^ 0x5a;
  await writeFile(victim, bytes);

  const verified = await running.cli(["backup", "verify", "--repo", repository]);
  assert.equal(verified.code, 1, `verify must fail: ${verified.stdout}${verified.stderr}`);
  const offsetBytes = slot * last.chunkSizeBytes;
  assert.match(verified.stdout, new RegExp(`^d0/${last.id}: at offset ${offsetBytes}\\b`, "m"));
  assert.doesNotMatch(verified.stdout, new RegExp(`d0/(${first.id}|${second.id})`), "only the last backup");

  const broken = join(directory, "broken.img");
  const failed = await running.cli([
    "backup",
    "restore",
    `d0/${last.id}`,
    "--repo",
    repository,
    "--to",
    broken,
  ]);
  assert.notEqual(failed.code, 0, "the restore of the damaged backup fails");
  assert.equal(failed.stderr.trim().split("\n").length, 1, `one line: ${failed.stderr}`);
  assert.match(failed.stderr, /chunk|digest|corrupt|damaged/i);
  const leftOver = await stat(broken).then(
    (info) => info.size,
    () => null,
  );
  assert.equal(leftOver, null, "no half-restored image is left under the name asked for");

  const again = join(directory, "again-2.img");
  await running.cliOk(["backup", "restore", `d0/${second.id}`, "--repo", repository, "--to", again]);
  await sameBytes(again, steps[1]?.image ?? "");
});

/**
 * Space accounting when the host file system under a difference storage is full (hostile-input item 14).
 * The storage is a directory on a small ext4 whose free space is used up by a filler file, the limit is far
 * above what fits, and the policy is fail-origin-write: origin writes that need a copy fail with ENOSPC.
 * The storage must report the space of the chunks really stored (failed copies give their regions back),
 * an `io_error` event must carry the real errno (ENOSPC), and the snapshot stays valid: after space is
 * freed the same writes succeed and the image still shows the data from before them.
 *
 * Root only (losetup, mkfs, mount); skipped with the reason otherwise.
 */
import assert from "node:assert/strict";
import { mkdtemp, rm } from "node:fs/promises";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { after, test } from "node:test";
import type { EventView, SnapshotView } from "../../src/daemon/api-types.js";
import { isRoot, missingTools, run } from "../helpers/commands.js";
import { mountScratchExt4 } from "../helpers/scratch-ext4.js";
import { DaemonProcess } from "./cli-harness.js";

const chunkBytes = 64 * 1024;
const cleanups: Array<() => Promise<unknown>> = [];

after(async () => {
  for (const cleanup of cleanups.reverse()) await cleanup().catch(() => {});
});

function qemuIo(uri: string, command: string) {
  return run("qemu-io", ["-f", "raw", uri, "-c", command], { timeoutMs: 60_000 });
}

void test("a full host file system: failed copies release their space, io_error says ENOSPC, snapshot stays valid", async (t) => {
  if (!isRoot) return t.skip("needs root (losetup, mount)");
  const missing = missingTools("losetup", "mkfs.ext4", "mount", "umount", "qemu-io", "dd");
  if (missing) return t.skip(missing);
  const directory = await mkdtemp(join(tmpdir(), "blocksnap-fullhost-"));
  cleanups.push(() => rm(directory, { recursive: true, force: true }));
  const { mountPoint } = await mountScratchExt4(
    directory,
    "small",
    { size: "32M", mkfsArgs: ["-m", "0"] },
    cleanups,
  );

  const daemon = await DaemonProcess.start(join(directory, "state"));
  cleanups.push(() => daemon.stop());
  await daemon.cliOk(["device", "add", "d0", "--backend", join(directory, "d0.img"), "--size", "32M"]);
  const uri = (exportName: string) => `nbd+unix:///${exportName}?socket=${daemon.nbdSocket}`;
  assert.equal((await qemuIo(uri("d0"), "write -P 0x11 0 32M")).code, 0);
  const id = (
    await daemon.cliOk([
      "snapshot",
      "create",
      "--storage",
      mountPoint,
      "--limit",
      "1G",
      "--growth-portion",
      "4M",
      "--chunk-size",
      "64K",
      "--on-cow-error",
      "fail-origin-write",
      "--device",
      "d0",
    ])
  ).trim();
  await daemon.cliOk(["snapshot", "take", id]);
  // Fill the host file system: the storage file is sparse, so its growth succeeds but writes find no blocks.
  const filler = join(mountPoint, "filler");
  await run("dd", ["if=/dev/zero", `of=${filler}`, "bs=1M", "count=64", "status=none"]);

  const write = await qemuIo(uri("d0"), "write -P 0x22 0 8M");
  assert.notEqual(write.code, 0, "origin writes that cannot be preserved fail under fail-origin-write");
  assert.match(write.stdout + write.stderr, /No space left on device/);

  const info = await daemon.cliJson<SnapshotView>(["snapshot", "info", id]);
  const storedBytes = info.devices[0]!.chunksStored * chunkBytes;
  assert.ok(
    info.storage.usedBytes <= storedBytes + chunkBytes, // the reserved head and the alignment of the first region
    `used ${info.storage.usedBytes} bytes for ${info.devices[0]!.chunksStored} stored chunks: failed copies leaked space`,
  );
  const events: string[] = [];
  for (let index = 0; index < 8; index++) {
    const view = await daemon.cliJson<EventView>(["snapshot", "wait-event", id, "--timeout", "100"]);
    if (view.event === null) break;
    events.push(JSON.stringify(view.event));
  }
  assert.ok(
    events.some((event) => event.includes('"io_error"') && event.includes('"ENOSPC"')),
    `an io_error event with ENOSPC; got ${events.join(", ")}`,
  );
  assert.ok(!events.some((event) => event.includes('"corrupted"')), "the snapshot is not corrupted");

  await rm(filler);
  assert.equal(
    (await qemuIo(uri("d0"), "write -P 0x22 0 8M")).code,
    0,
    "after space is freed the write succeeds",
  );
  assert.equal((await qemuIo(uri(`d0@${id}`), "read -P 0x11 0 8M")).code, 0, "the image keeps the old data");
  assert.equal((await qemuIo(uri("d0"), "read -P 0x22 0 8M")).code, 0, "the origin has the new data");
});

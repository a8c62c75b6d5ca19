/**
 * A stalled difference storage stalls only its own snapshot (hostile-input item 5). A snapshot of d0 keeps
 * its difference storage on an ext4 that is then frozen with `fsfreeze -f`: an origin write to d0 that must
 * preserve a chunk waits in the kernel until thaw. Meanwhile another device (d1) must keep answering NBD
 * reads and the control API must keep answering: the check is an ordering one (both complete while the
 * d0 write is still pending), with a generous hard timeout instead of a latency threshold. After thaw the
 * d0 write completes and the snapshot image still holds the data from before it.
 *
 * Root only (losetup, mkfs, mount, fsfreeze); skipped with the reason otherwise. The file system is always
 * thawed in a `finally`, then unmounted and its loop device detached in `after`.
 */
import assert from "node:assert/strict";
import { mkdtemp, rm } from "node:fs/promises";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { after, test } from "node:test";
import { isRoot, missingTools, run, runOk } from "../helpers/commands.js";
import { mountScratchExt4 } from "../helpers/scratch-ext4.js";
import { cliPath, DaemonProcess, runCli, runCommand } from "./cli-harness.js";

const deviceSizeBytes = 16 << 20;
/** How long a probe of the unaffected device may take before the test calls the daemon stalled. */
const probeTimeoutMs = 20_000;
/** Time given to the d0 write to reach the frozen storage before the probes start. */
const settleMs = 500;

const cleanups: Array<() => Promise<unknown>> = [];

after(async () => {
  for (const cleanup of cleanups.reverse()) await cleanup().catch(() => {});
});

function skipReason(): string | undefined {
  if (!isRoot) return "needs root (losetup, mount, fsfreeze)";
  return missingTools("losetup", "mkfs.ext4", "mount", "umount", "fsfreeze", "qemu-io");
}

function qemuIo(uri: string, command: string, timeoutMs: number) {
  return run("qemu-io", ["-f", "raw", uri, "-c", command], { timeoutMs });
}

void test("a frozen difference storage stalls only its snapshot: other devices and the API keep answering", async (t) => {
  const reason = skipReason();
  if (reason) return t.skip(reason);
  const directory = await mkdtemp(join(tmpdir(), "blocksnap-frozen-"));
  cleanups.push(() => rm(directory, { recursive: true, force: true }));

  const { mountPoint } = await mountScratchExt4(directory, "frozen", { size: "64M" }, cleanups);

  const daemon = await DaemonProcess.start(join(directory, "state"));
  cleanups.push(() => daemon.stop());
  for (const name of ["d0", "d1"]) {
    await daemon.cliOk([
      "device",
      "add",
      name,
      "--backend",
      join(directory, `${name}.img`),
      "--size",
      String(deviceSizeBytes),
    ]);
  }
  const uri = (exportName: string) => `nbd+unix:///${exportName}?socket=${daemon.nbdSocket}`;
  assert.equal((await qemuIo(uri("d0"), "write -P 0x11 0 16M", 60_000)).code, 0);
  assert.equal((await qemuIo(uri("d1"), "write -P 0x33 0 16M", 60_000)).code, 0);
  const id = (
    await daemon.cliOk([
      "snapshot",
      "create",
      "--storage",
      mountPoint,
      "--limit",
      "32M",
      "--chunk-size",
      "64K",
      "--device",
      "d0",
    ])
  ).trim();
  await daemon.cliOk(["snapshot", "take", id]);

  await runOk("fsfreeze", ["-f", mountPoint]);
  let stalledWrite: Promise<{ code: number }> | undefined;
  let writeDone = false;
  try {
    stalledWrite = qemuIo(uri("d0"), "write -P 0x22 0 1M", 120_000).then((result) => {
      writeDone = true;
      return result;
    });
    await new Promise((resolve) => setTimeout(resolve, settleMs));
    assert.equal(
      writeDone,
      false,
      "the d0 write finished although its storage is frozen: nothing was tested",
    );

    const read = await qemuIo(uri("d1"), "read -P 0x33 0 1M", probeTimeoutMs);
    assert.equal(read.code, 0, `NBD read of d1 while d0's storage is frozen: ${read.stdout}${read.stderr}`);
    const status = await runCommand("timeout", [
      String(probeTimeoutMs / 1000),
      process.execPath,
      cliPath,
      "device",
      "list",
      "--json",
      "--state-dir",
      daemon.stateDir,
    ]);
    assert.equal(status.code, 0, `status while d0's storage is frozen: ${status.stderr}`);
    assert.match(status.stdout, /"d1"/);
    assert.equal(writeDone, false, "d1 and the API were checked while the d0 write was still waiting");
  } finally {
    await run("fsfreeze", ["-u", mountPoint]);
  }
  const written = await stalledWrite;
  assert.equal(written.code, 0, "the d0 write completes after thaw");

  assert.equal((await qemuIo(uri(`d0@${id}`), "read -P 0x11 0 1M", 60_000)).code, 0, "image keeps old data");
  assert.equal((await qemuIo(uri("d0"), "read -P 0x22 0 1M", 60_000)).code, 0, "origin has the new data");
  const events = await runCli(["snapshot", "info", id, "--json", "--state-dir", daemon.stateDir]);
  assert.equal(events.code, 0, events.stderr);
  assert.doesNotMatch(events.stdout, /"corrupted"/);
});

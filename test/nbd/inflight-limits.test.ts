/**
 * What one NBD client's requests may cost the others, through the real daemon and python3-libnbd:
 * - the in-flight memory budget: 24 connections each writing 32 MiB at once must not pin 24 × 32 MiB
 *   (the daemon's peak RSS, reset through /proc/PID/clear_refs, is compared with its RSS before);
 * - a long WRITE_ZEROES yields: while one connection zeroes 512 MiB under a snapshot (each slice copied
 *   before it is zeroed), small reads on another connection keep completing. An ordering check, no timing:
 *   we count the reads answered before the zeroing's reply arrives.
 */
import assert from "node:assert/strict";
import { mkdtemp, readFile, rm, writeFile } from "node:fs/promises";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { after, before, test } from "node:test";
import { DaemonProcess } from "../cli/cli-harness.js";
import { run } from "../helpers/commands.js";

const systemPython = "/usr/bin/python3";
let directory = "";

before(async () => {
  directory = await mkdtemp(join(tmpdir(), "blocksnap-inflight-"));
});

after(async () => {
  await rm(directory, { recursive: true, force: true });
});

async function skipReason(): Promise<string | undefined> {
  const probe = await run(systemPython, ["-c", "import nbd"]);
  return probe.code === 0 ? undefined : "python3-libnbd is not installed";
}

async function statusKib(pid: number, field: "VmRSS" | "VmHWM"): Promise<number> {
  const text = await readFile(`/proc/${pid}/status`, "utf8");
  const match = new RegExp(`^${field}:\\s+(\\d+) kB$`, "m").exec(text);
  assert.ok(match, `${field} in /proc/${pid}/status`);
  return Number(match[1]);
}

const parallelWritesScript = `
import nbd, sys, threading
path, connections, rounds = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
handles = []
for _ in range(connections):
    h = nbd.NBD()
    h.set_export_name("disk0")
    h.connect_unix(path)
    handles.append(h)
payload = bytearray(b"\\x5a" * (32 << 20))
barrier = threading.Barrier(connections, timeout=60)
failures = []
def write(h):
    barrier.wait()
    try:
        for _ in range(rounds):
            h.pwrite(payload, 0)
    except Exception as error:
        failures.append(error)
threads = [threading.Thread(target=write, args=(h,)) for h in handles]
for t in threads: t.start()
for t in threads: t.join()
print("failures", len(failures))
`;

void test("24 connections writing 32 MiB each at once stay within the in-flight memory budget", async (t) => {
  const reason = await skipReason();
  if (reason !== undefined) return t.skip(reason);
  const daemon = await DaemonProcess.start(join(directory, "budget"));
  try {
    // Every connection writes the same 32 MiB: the device itself holds 32 MiB whatever happens.
    await daemon.cliOk(["device", "add", "disk0", "--backend", "memory:", "--size", "32M"]);
    // Resets the peak (VmHWM) to the current RSS.
    await writeFile(`/proc/${daemon.pid}/clear_refs`, "5");
    const rssBeforeKib = await statusKib(daemon.pid, "VmRSS");
    const writes = await run(systemPython, ["-c", parallelWritesScript, daemon.nbdSocket, "24", "3"], {
      timeoutMs: 300_000,
    });
    assert.equal(writes.code, 0, writes.stderr);
    assert.match(writes.stdout, /^failures 0$/m);
    const growthMib = ((await statusKib(daemon.pid, "VmHWM")) - rssBeforeKib) / 1024;
    t.diagnostic(`peak RSS growth ${growthMib.toFixed(0)} MiB`);
    // One client's share of the budget (128 MiB) + the reply buffer pool (64 MiB) + Node's socket chunks
    // and garbage not yet collected. Without a budget 24 × 32 MiB = 768 MiB were pinned (+830 MiB here).
    assert.ok(growthMib < 400, `peak RSS grew by ${growthMib.toFixed(0)} MiB`);
  } finally {
    await daemon.stop();
  }
});

const zeroWhileReadingScript = `
import nbd, sys
path = sys.argv[1]
zeroer = nbd.NBD(); zeroer.set_export_name("disk0"); zeroer.connect_unix(path)
reader = nbd.NBD(); reader.set_export_name("disk0"); reader.connect_unix(path)
cookie = zeroer.aio_zero(512 << 20, 0)
reads = 0
while reads < 10_000_000:
    reader.pread(512, 0)
    reads += 1
    zeroer.poll(0)
    if zeroer.aio_command_completed(cookie):
        break
print("reads", reads)
`;

void test("a long WRITE_ZEROES lets another connection's reads through", async (t) => {
  const reason = await skipReason();
  if (reason !== undefined) return t.skip(reason);
  const daemon = await DaemonProcess.start(join(directory, "zero"));
  try {
    await daemon.cliOk(["device", "add", "disk0", "--backend", "memory:", "--size", "1G"]);
    // Under a snapshot with a memory storage every zeroed chunk is first copied: the slow, synchronous path.
    const id = (
      await daemon.cliOk([
        "snapshot",
        "create",
        "--storage",
        "memory:",
        "--limit",
        "768M",
        "--device",
        "disk0",
      ])
    ).trim();
    await daemon.cliOk(["snapshot", "take", id]);
    const result = await run(systemPython, ["-c", zeroWhileReadingScript, daemon.nbdSocket], {
      timeoutMs: 300_000,
    });
    assert.equal(result.code, 0, result.stderr);
    const reads = Number(/^reads (\d+)$/m.exec(result.stdout)?.[1]);
    t.diagnostic(`${reads} reads answered while 512 MiB were zeroed`);
    // 32 slices of 16 MiB, each followed by a yield; in one piece the zeroing let at most one read through.
    assert.ok(reads >= 8, `only ${reads} reads were answered before the zeroing finished`);
  } finally {
    await daemon.stop();
  }
});

/**
 * The Prometheus endpoint through the real daemon: GET /metrics on the control socket, parsed by real
 * parsers (promtool check metrics, the Python client's parser), scraped before and after I/O issued by
 * real clients — qemu-io over NBD (one request per command: exact counts and bytes), dd through the FUSE
 * file (the kernel may split requests: exact bytes, counts at least). Skips with a reason when a parser
 * or client is absent, or FUSE without root.
 */
import assert from "node:assert/strict";
import { mkdtemp, rm, writeFile } from "node:fs/promises";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { after, before, test } from "node:test";
import type { DeviceView, SnapshotView } from "../../src/daemon/api-types.js";
import { exposition } from "../../src/metrics/text-format.js";
import { DaemonProcess, runCommand } from "../cli/cli-harness.js";
import {
  hasSample,
  httpGet,
  parseWithPrometheusClient,
  promtoolProblems,
  type Sample,
  sampleValue,
} from "./scrape.js";

const isRoot = process.getuid?.() === 0;
let directory = "";

before(async () => {
  directory = await mkdtemp(join(tmpdir(), "blocksnap-metrics-"));
});

after(async () => {
  await rm(directory, { recursive: true, force: true });
});

/** Scrapes, checks the answer's type and promtool's verdict, and parses; a string: why it cannot. */
async function scrape(daemon: DaemonProcess): Promise<Sample[] | string> {
  const answer = await httpGet({ socketPath: daemon.controlSocket }, "/metrics");
  assert.equal(answer.status, 200, answer.body);
  assert.equal(answer.contentType, exposition.contentType);
  const problems = await promtoolProblems(answer.body);
  if (problems === null) console.log("# promtool is absent (Debian package prometheus): format lint skipped");
  else assert.equal(problems, "", `promtool check metrics:\n${problems}`);
  return parseWithPrometheusClient(answer.body);
}

async function hasTool(name: string): Promise<boolean> {
  try {
    await runCommand(name, ["--version"]);
    return true;
  } catch {
    return false;
  }
}

async function qemuIo(uri: string, commands: readonly string[]): Promise<void> {
  const result = await runCommand("qemu-io", ["-f", "raw", ...commands.flatMap((c) => ["-c", c]), uri]);
  assert.equal(result.code, 0, `qemu-io failed: ${result.stdout}${result.stderr}`);
}

const kib = 1024;
const io = (device: string, op: string, snapshot?: string): Record<string, string> =>
  snapshot === undefined ? { device, op } : { device, snapshot, op };

void test("GET /metrics over NBD I/O by qemu-io: counts, bytes, latency, CBT, storage and take stall", async (t) => {
  if (!(await hasTool("qemu-io"))) return t.skip("qemu-io is not installed (qemu-utils)");
  const daemon = await DaemonProcess.start(join(directory, "nbd"));
  try {
    await daemon.cliOk(["device", "add", "d0", "--backend", "memory:", "--size", "8M"]);
    const before = await scrape(daemon);
    if (typeof before === "string") return t.skip(before);
    assert.equal(sampleValue(before, "blocksnap_io_requests_total", io("d0", "write")), 0);
    assert.equal(sampleValue(before, "blocksnap_build_info", { version: versionLabel(before) }), 1);
    assert.ok(sampleValue(before, "process_start_time_seconds", {}) > 1.7e9);

    const uri = `nbd+unix:///d0?socket=${daemon.nbdSocket}`;
    const writes = Array.from({ length: 8 }, (_, index) => `write -P ${index + 1} ${index * 64}k 64k`);
    const reads = Array.from({ length: 3 }, (_, index) => `read ${index * 128}k 128k`);
    await qemuIo(uri, [...writes, ...reads]);
    const afterIo = await scrape(daemon);
    assert.ok(typeof afterIo !== "string");
    const delta = (name: string, labels: Record<string, string>) =>
      sampleValue(afterIo, name, labels) - sampleValue(before, name, labels);
    // One NBD request per qemu-io command of 64 KiB: exact.
    assert.equal(delta("blocksnap_io_requests_total", io("d0", "write")), 8);
    assert.equal(delta("blocksnap_io_bytes_total", io("d0", "write")), 8 * 64 * kib);
    assert.ok(delta("blocksnap_io_requests_total", io("d0", "read")) >= 3);
    assert.ok(delta("blocksnap_io_bytes_total", io("d0", "read")) >= 3 * 128 * kib);
    assert.equal(delta("blocksnap_io_errors_total", io("d0", "write")), 0);
    // The histogram agrees with the counter, and its buckets only grow.
    assert.equal(
      sampleValue(afterIo, "blocksnap_io_request_duration_seconds_count", io("d0", "write")),
      sampleValue(afterIo, "blocksnap_io_requests_total", io("d0", "write")),
    );
    const buckets = afterIo
      .filter((s) => s.name === "blocksnap_io_request_duration_seconds_bucket")
      .filter((s) => s.labels.device === "d0" && s.labels.op === "write" && s.labels.snapshot === undefined);
    assert.equal(buckets.length, 18);
    for (let index = 1; index < buckets.length; index++) {
      assert.ok(buckets[index]!.value >= buckets[index - 1]!.value, "cumulative buckets");
    }
    assert.equal(buckets.at(-1)!.labels.le, "+Inf");
    assert.equal(
      buckets.at(-1)!.value,
      8 + sampleValue(before, "blocksnap_io_requests_total", io("d0", "write")),
    );
    assert.ok(sampleValue(afterIo, "blocksnap_io_request_duration_seconds_sum", io("d0", "write")) > 0);
    // CBT: 64 KiB tracking blocks, eight of them written.
    assert.equal(sampleValue(afterIo, "blocksnap_cbt_block_size_bytes", { device: "d0" }), 64 * kib);
    assert.equal(sampleValue(afterIo, "blocksnap_cbt_dirty_blocks", { device: "d0" }), 8);

    const id = (
      await daemon.cliOk(["snapshot", "create", "--storage", "memory:", "--limit", "16M", "--device", "d0"])
    ).trim();
    await daemon.cliOk(["snapshot", "take", id, "--no-freeze"]);
    await qemuIo(uri, ["write -P 0x77 0 64k"]);
    await qemuIo(`nbd+unix:///d0@${id}?socket=${daemon.nbdSocket}`, ["read 0 128k"]);
    const afterTake = await scrape(daemon);
    assert.ok(typeof afterTake !== "string");
    const info = await daemon.cliJson<SnapshotView>(["snapshot", "info", id]);
    // A new CBT epoch: only the block written since the take.
    assert.equal(sampleValue(afterTake, "blocksnap_cbt_dirty_blocks", { device: "d0" }), 1);
    assert.equal(sampleValue(afterTake, "blocksnap_snapshots", { state: "taken" }), 1);
    assert.equal(
      sampleValue(afterTake, "blocksnap_snapshot_storage_limit_bytes", { snapshot: id }),
      16 << 20,
    );
    assert.equal(
      sampleValue(afterTake, "blocksnap_snapshot_storage_used_bytes", { snapshot: id }),
      info.storage.usedBytes,
    );
    assert.ok(info.storage.usedBytes >= 64 * kib);
    assert.equal(
      sampleValue(afterTake, "blocksnap_snapshot_chunks_stored", { snapshot: id, device: "d0" }),
      1,
    );
    assert.ok(hasSample(afterTake, "blocksnap_snapshot_take_stall_seconds", { snapshot: id }));
    assert.equal(
      sampleValue(afterTake, "blocksnap_snapshot_take_stall_seconds", { snapshot: id }),
      (info.takeStallMs ?? Number.NaN) / 1000,
    );
    // Copy-before-write: the one 256 KiB chunk under the write, copied once.
    assert.equal(sampleValue(afterTake, "blocksnap_cow_copies_total", { snapshot: id, device: "d0" }), 1);
    assert.equal(
      sampleValue(afterTake, "blocksnap_cow_copied_bytes_total", { snapshot: id, device: "d0" }),
      256 * kib,
    );
    assert.equal(sampleValue(afterTake, "blocksnap_take_stall_seconds_count", {}), 1);
    assert.equal(
      sampleValue(afterTake, "blocksnap_take_stall_last_seconds", {}),
      (info.takeStallMs ?? Number.NaN) / 1000,
    );
    // qemu-io: one connection per run, three runs so far.
    assert.ok(sampleValue(afterTake, "blocksnap_nbd_connections_accepted_total", {}) >= 3);
    // The image's own counters, labelled with its snapshot.
    assert.ok(sampleValue(afterTake, "blocksnap_io_bytes_total", io("d0", "read", id)) >= 128 * kib);

    await daemon.cliOk(["snapshot", "destroy", id]);
    const afterDestroy = await scrape(daemon);
    assert.ok(typeof afterDestroy !== "string");
    assert.ok(
      !hasSample(afterDestroy, "blocksnap_io_bytes_total", io("d0", "read", id)),
      "image series gone",
    );
    assert.ok(!hasSample(afterDestroy, "blocksnap_snapshot_storage_limit_bytes", { snapshot: id }));

    // A snapshot whose storage holds one chunk breaks at the second: one corrupted event, counted.
    const small = (
      await daemon.cliOk(["snapshot", "create", "--storage", "memory:", "--limit", "256K", "--device", "d0"])
    ).trim();
    await daemon.cliOk(["snapshot", "take", small, "--no-freeze"]);
    await qemuIo(uri, ["write 0 64k", "write 1m 64k"]);
    const afterBreak = await scrape(daemon);
    assert.ok(typeof afterBreak !== "string");
    const corrupted = { type: "corrupted" };
    assert.equal(
      sampleValue(afterBreak, "blocksnap_events_total", corrupted) -
        sampleValue(afterDestroy, "blocksnap_events_total", corrupted),
      1,
    );
    assert.equal(sampleValue(afterBreak, "blocksnap_snapshots", { state: "corrupted" }), 1);
    assert.equal(sampleValue(afterBreak, "blocksnap_take_stall_seconds_count", {}), 2);
    assert.equal(
      sampleValue(afterBreak, "blocksnap_io_bytes_total", io("d0", "write")) -
        sampleValue(afterDestroy, "blocksnap_io_bytes_total", io("d0", "write")),
      128 * kib,
      "the origin writes went on",
    );
  } finally {
    await daemon.stop();
  }
});

void test("GET /metrics after dd through the FUSE file: write bytes exact, requests at least", async (t) => {
  if (!isRoot) return t.skip("mounting FUSE needs root");
  const daemon = await DaemonProcess.start(join(directory, "fuse"), { args: ["--nbd-listen", "none"] });
  try {
    const device = await daemon.cliJson<DeviceView>([
      "device",
      "add",
      "f0",
      "--backend",
      "memory:",
      "--size",
      "4M",
    ]);
    assert.ok(device.fusePath !== null && device.fusePath !== undefined);
    const before = await scrape(daemon);
    if (typeof before === "string") return t.skip(before);
    const input = join(directory, "fuse-input");
    await writeFile(input, Buffer.alloc(1024 * kib, 0x3c));
    const written = await runCommand("dd", [
      `if=${input}`,
      `of=${device.fusePath}`,
      "bs=64k",
      "count=16",
      "oflag=direct",
      "conv=notrunc",
    ]);
    assert.equal(written.code, 0, written.stderr);
    const read = await runCommand("dd", [
      `if=${device.fusePath}`,
      "of=/dev/null",
      "bs=64k",
      "count=4",
      "iflag=direct",
    ]);
    assert.equal(read.code, 0, read.stderr);
    const afterIo = await scrape(daemon);
    assert.ok(typeof afterIo !== "string");
    const delta = (name: string, labels: Record<string, string>) =>
      sampleValue(afterIo, name, labels) - sampleValue(before, name, labels);
    assert.equal(delta("blocksnap_io_bytes_total", io("f0", "write")), 1024 * kib);
    assert.ok(delta("blocksnap_io_requests_total", io("f0", "write")) >= 16);
    assert.ok(delta("blocksnap_io_bytes_total", io("f0", "read")) >= 256 * kib);
    assert.ok(delta("blocksnap_io_requests_total", io("f0", "read")) >= 4);
    assert.equal(sampleValue(afterIo, "blocksnap_cbt_dirty_blocks", { device: "f0" }), 16);
    assert.ok(delta("blocksnap_face_requests_total", { face: "fuse" }) >= 16 + 4);
  } finally {
    await daemon.stop();
  }
});

function versionLabel(samples: readonly Sample[]): string {
  const info = samples.find((sample) => sample.name === "blocksnap_build_info");
  assert.ok(info !== undefined, "blocksnap_build_info is present");
  assert.ok((info.labels.version ?? "") !== "");
  return info.labels.version!;
}

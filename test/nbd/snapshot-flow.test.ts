/**
 * End-to-end snapshot flow over NBD only, with the Engine as the ExportSource: real clients write the
 * origin, the engine takes a snapshot, real clients overwrite the origin, and qemu-img compare / nbdcopy
 * prove the image export `<device>@<id>` still holds the pre-snapshot bytes while the origin holds the new
 * ones; writes to the image leave the origin alone; fio verifies the origin while snapshots are taken and
 * destroyed underneath it.
 */
import assert from "node:assert/strict";
import { randomBytes } from "node:crypto";
import { mkdtemp, readFile, rm, writeFile } from "node:fs/promises";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { after, before, test } from "node:test";
import { Engine } from "../../src/engine/engine.js";
import { NbdServer } from "../../src/nbd/nbd-server.js";
import { missingTools, run, runOk } from "../helpers/commands.js";

const mib = 1024 * 1024;
const sizeBytes = 16 * mib;
let directory: string;
let engine: Engine;
let server: NbdServer;
let socketPath: string;
let preSnapshot: Buffer;

const uri = (exportName: string) => `nbd+unix:///${encodeURIComponent(exportName)}?socket=${socketPath}`;

before(async () => {
  directory = await mkdtemp(join(tmpdir(), "blocksnap-nbd-flow-"));
  socketPath = join(directory, "nbd.sock");
  engine = new Engine();
  server = new NbdServer(engine);
  await server.listenUnix(socketPath);
  await engine.addDevice({ name: "disk0", backendPath: join(directory, "disk0.img"), sizeBytes });
  await engine.addDevice({ name: "disk1", backendPath: join(directory, "disk1.img"), sizeBytes });
});

after(async () => {
  await server.close();
  await engine.close();
  await rm(directory, { recursive: true, force: true });
});

test("the image export keeps the pre-snapshot bytes while the origin takes new writes", async (t) => {
  const skip = missingTools("qemu-io", "qemu-img", "nbdcopy");
  if (skip) return t.skip(skip);
  // Fill the origin over NBD with random bytes, then snapshot it.
  preSnapshot = randomBytes(sizeBytes);
  const preFile = join(directory, "pre.img");
  await writeFile(preFile, preSnapshot);
  await runOk("nbdcopy", ["--flush", preFile, uri("disk0")]);
  const snapshot = await engine.createSnapshot({
    storage: "memory:",
    limitBytes: 64 * mib,
    devices: ["disk0"],
  });
  await engine.takeSnapshot(snapshot.id);
  const image = `disk0@${snapshot.id}`;

  await runOk("qemu-io", [
    "-f",
    "raw",
    uri("disk0"),
    "-c",
    "write -P 0x55 0 4M",
    "-c",
    "write -P 0x66 10M 1M",
  ]);
  await runOk("qemu-io", ["-f", "raw", uri("disk0"), "-c", "write -z 12M 256k", "-c", "discard 14M 1M"]);

  const identical = await run("qemu-img", ["compare", "-f", "raw", "-F", "raw", uri(image), preFile]);
  assert.equal(identical.code, 0, identical.stdout + identical.stderr);
  const imageCopy = join(directory, "image.img");
  await runOk("nbdcopy", ["-C", "4", uri(image), imageCopy]);
  assert.ok(
    (await readFile(imageCopy)).equals(preSnapshot),
    "nbdcopy -C 4 of the image differs from the pre-snapshot bytes",
  );

  const originCopy = join(directory, "origin.img");
  await runOk("nbdcopy", [uri("disk0"), originCopy]);
  const origin = await readFile(originCopy);
  assert.ok(origin.subarray(0, 4 * mib).every((byte) => byte === 0x55));
  assert.ok(origin.subarray(10 * mib, 11 * mib).every((byte) => byte === 0x66));
  assert.ok(origin.subarray(12 * mib, 12 * mib + 256 * 1024).every((byte) => byte === 0));
  assert.ok(origin.subarray(4 * mib, 10 * mib).equals(preSnapshot.subarray(4 * mib, 10 * mib)));
  const differs = await run("qemu-img", ["compare", "-f", "raw", "-F", "raw", uri("disk0"), preFile]);
  assert.equal(differs.code, 1, differs.stdout + differs.stderr);

  // Writes to the image land in the image only.
  await runOk("qemu-io", [
    "-f",
    "raw",
    uri(image),
    "-c",
    "write -P 0x77 1M 64k",
    "-c",
    "write -P 0x78 6M 4k",
  ]);
  const imageRead = await runOk("qemu-io", [
    "-f",
    "raw",
    uri(image),
    "-c",
    "read -P 0x77 1M 64k",
    "-c",
    "read -P 0x78 6M 4k",
  ]);
  assert.doesNotMatch(imageRead, /Pattern verification failed/);
  const originRead = await runOk("qemu-io", ["-f", "raw", uri("disk0"), "-c", "read -P 0x55 1M 64k"]);
  assert.doesNotMatch(originRead, /Pattern verification failed/);
  await runOk("nbdcopy", [uri("disk0"), originCopy]);
  const originAfter = await readFile(originCopy);
  assert.ok(
    originAfter.subarray(6 * mib, 6 * mib + 4096).equals(preSnapshot.subarray(6 * mib, 6 * mib + 4096)),
  );

  await engine.destroySnapshot(snapshot.id);
  const gone = await run("nbdinfo", ["--size", uri(image)]);
  assert.notEqual(gone.code, 0, "the image export disappears with its snapshot");
});

test("fio verifies the origin while snapshots are taken and destroyed underneath it", async (t) => {
  const skip = missingTools("fio");
  if (skip) return t.skip(skip);
  const output = join(directory, "fio.json");
  const fio = run(
    "fio",
    [
      "--name=flow",
      "--ioengine=nbd",
      `--uri=${uri("disk1")}`,
      "--rw=randwrite",
      "--bs=4k",
      "--iodepth=8",
      "--size=16M",
      "--verify=crc32c",
      "--verify_backlog=16",
      "--verify_state_save=0",
      "--verify_fatal=1",
      "--runtime=2",
      "--time_based",
      "--output-format=json",
      `--output=${output}`,
    ],
    { timeoutMs: 60_000 },
  );
  let finished = false;
  fio.then(() => {
    finished = true;
  });
  let cycles = 0;
  while (!finished) {
    const snapshot = await engine.createSnapshot({
      storage: "memory:",
      limitBytes: 64 * mib,
      devices: ["disk1"],
    });
    await engine.takeSnapshot(snapshot.id);
    await new Promise((resolve) => setTimeout(resolve, 50));
    await engine.destroySnapshot(snapshot.id);
    cycles += 1;
  }
  const result = await fio;
  assert.equal(result.code, 0, result.stdout + result.stderr);
  const text = await readFile(output, "utf8");
  const job = (
    JSON.parse(text.slice(text.indexOf("{"))) as {
      jobs: Array<{ error: number; read: { io_bytes: number } }>;
    }
  ).jobs[0]!;
  assert.equal(job.error, 0);
  assert.ok(job.read.io_bytes > 0, "fio verified nothing");
  assert.ok(cycles >= 1, "no snapshot was taken during the run");
});

test("nbdinfo --list and --json show origin and image exports, and they come and go with the snapshot", async (t) => {
  const skip = missingTools("nbdinfo");
  if (skip) return t.skip(skip);
  const snapshot = await engine.createSnapshot({
    storage: "memory:",
    limitBytes: 64 * mib,
    devices: ["disk1"],
  });
  await engine.takeSnapshot(snapshot.id);
  const image = `disk1@${snapshot.id}`;
  type Listed = { exports: Array<{ "export-name": string; description?: string; "export-size": number }> };
  const listed = JSON.parse(await runOk("nbdinfo", ["--json", "--list", uri("disk1")])) as Listed;
  const byName = new Map(listed.exports.map((entry) => [entry["export-name"], entry]));
  assert.ok(byName.has("disk0") && byName.has("disk1"), "origins are listed");
  assert.equal(byName.get(image)?.["export-size"], sizeBytes);
  assert.match(byName.get(image)?.description ?? "", /snapshot image of disk1/);
  type Info = {
    exports: Array<{ "export-size": number; is_read_only: boolean; can_trim: boolean; can_flush: boolean }>;
  };
  const info = JSON.parse(await runOk("nbdinfo", ["--json", uri(image)])) as Info;
  assert.equal(info.exports[0]?.["export-size"], sizeBytes);
  assert.equal(info.exports[0]?.is_read_only, false, "images are writable, as in blksnap");
  assert.equal(info.exports[0]?.can_flush, true);
  const map = await runOk("nbdinfo", ["--map", uri(image)]);
  assert.match(map, new RegExp(`^\\s*0\\s+${sizeBytes}\\s+0\\s+data`, "m"), "one data extent");
  await engine.destroySnapshot(snapshot.id);
  const after = JSON.parse(await runOk("nbdinfo", ["--json", "--list", uri("disk1")])) as Listed;
  assert.ok(!after.exports.some((entry) => entry["export-name"] === image), "the image export is gone");
});

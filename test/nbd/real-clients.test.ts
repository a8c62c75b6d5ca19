/**
 * Real clients nobody on this project wrote, against an in-process NbdServer: nbdinfo (--json, --list,
 * --map), the libnbd Python smoke of docs/design/nbd-notes.md (with and without structured replies),
 * qemu-io pattern round trips (with -z and -f), qemu-img compare, nbdcopy -C 4 and fio --ioengine=nbd with
 * crc32c verification. Exports: a MemoryBackend disk (real holes), a read-only MemoryBackend, and a
 * FileBackend disk. Every tool that is missing skips its test with the reason.
 */
import assert from "node:assert/strict";
import { randomBytes } from "node:crypto";
import { readFile, writeFile } from "node:fs/promises";
import { join } from "node:path";
import { after, before, test } from "node:test";
import type { FileBackend } from "../../src/backends/file-backend.js";
import { missingTools, run, runOk } from "../helpers/commands.js";
import type { TestServer } from "./nbd-test-helpers.js";
import {
  fileExport,
  hasLibnbdPython,
  libnbdPython,
  memoryExport,
  sourceTreeFile,
  startTestServer,
} from "./nbd-test-helpers.js";

const mib = 1024 * 1024;
const fileSizeBytes = 16 * mib;
let fixture: TestServer;
let fileBackend: FileBackend;
let filePath: string;

before(async () => {
  fixture = await startTestServer([memoryExport("mem", 32 * mib), memoryExport("ro", 4 * mib, true)]);
  filePath = join(fixture.directory, "disk.img");
  await writeFile(filePath, randomBytes(fileSizeBytes));
  const file = fileExport("file", filePath, fileSizeBytes);
  fileBackend = file.backend;
  fixture.source.add(file.entry);
});

after(async () => {
  await fixture.close();
  await fileBackend.close();
});

interface NbdinfoExport {
  "export-name": string;
  description: string;
  "export-size": number;
  is_read_only: boolean;
  can_flush: boolean;
  can_fua: boolean;
  can_trim: boolean;
  can_zero: boolean;
  can_multi_conn: boolean;
  can_df: boolean;
  contexts: string[];
  block_size_maximum: number;
}

test("nbdinfo --json describes a read-write and a read-only export", async (t) => {
  const skip = missingTools("nbdinfo");
  if (skip) return t.skip(skip);
  const readWrite = JSON.parse(await runOk("nbdinfo", ["--json", fixture.uri("mem")])) as {
    structured: boolean;
    exports: NbdinfoExport[];
  };
  assert.equal(readWrite.structured, true);
  const mem = readWrite.exports[0]!;
  assert.equal(mem["export-name"], "mem");
  assert.equal(mem["export-size"], 32 * mib);
  assert.equal(mem.description, "memory export mem");
  assert.deepEqual(
    [
      mem.is_read_only,
      mem.can_flush,
      mem.can_fua,
      mem.can_trim,
      mem.can_zero,
      mem.can_multi_conn,
      mem.can_df,
    ],
    [false, true, true, true, true, true, true],
  );
  assert.deepEqual(mem.contexts, ["base:allocation"]);
  assert.equal(mem.block_size_maximum, 32 * mib);
  const readOnly = JSON.parse(await runOk("nbdinfo", ["--json", fixture.uri("ro")])) as {
    exports: NbdinfoExport[];
  };
  const ro = readOnly.exports[0]!;
  assert.deepEqual([ro.is_read_only, ro.can_fua, ro.can_trim, ro.can_zero], [true, false, false, false]);
  const isReadOnly = await run("nbdinfo", ["--is", "read-only", fixture.uri("ro")]);
  assert.equal(isReadOnly.code, 0);
  const isReadOnlyMem = await run("nbdinfo", ["--is", "read-only", fixture.uri("mem")]);
  assert.equal(isReadOnlyMem.code, 2);
});

test("nbdinfo --list lists every export with its description", async (t) => {
  const skip = missingTools("nbdinfo");
  if (skip) return t.skip(skip);
  const listing = JSON.parse(await runOk("nbdinfo", ["--list", "--json", fixture.uri("mem")])) as {
    exports: NbdinfoExport[];
  };
  const names = listing.exports.map((entry) => [
    entry["export-name"],
    entry.description,
    entry["export-size"],
  ]);
  assert.deepEqual(names.sort(), [
    ["file", "file export file", fileSizeBytes],
    ["mem", "memory export mem", 32 * mib],
    ["ro", "memory export ro", 4 * mib],
  ]);
});

test("nbdinfo --map shows base:allocation holes and data of a MemoryBackend", async (t) => {
  const skip = missingTools("nbdinfo", "qemu-io");
  if (skip) return t.skip(skip);
  await runOk("qemu-io", [
    "-f",
    "raw",
    fixture.uri("mem"),
    "-c",
    "write -P 0x5a 1M 128k",
    "-c",
    "discard 0 1M",
  ]);
  const map = JSON.parse(await runOk("nbdinfo", ["--map", "--json", fixture.uri("mem")])) as Array<{
    offset: number;
    length: number;
    type: number;
  }>;
  const dataExtents = map
    .filter((extent) => extent.type === 0)
    .map((extent) => [extent.offset, extent.length]);
  assert.deepEqual(dataExtents, [[mib, 128 * 1024]]);
  const total = map.reduce((sum, extent) => sum + extent.length, 0);
  assert.equal(total, 32 * mib);
  assert.ok(map.some((extent) => extent.type === 3 && extent.offset === 0));
  await runOk("qemu-io", ["-f", "raw", fixture.uri("mem"), "-c", "discard 1M 128k"]);
});

test("libnbd smoke (Appendix A) passes with and without structured replies on every export", async (t) => {
  if (!(await hasLibnbdPython()))
    return t.skip(`requires ${libnbdPython} with the nbd module (python3-libnbd)`);
  const script = sourceTreeFile("test/nbd/smoke.py");
  for (const exportName of ["mem", "ro", "file"]) {
    const result = await run(libnbdPython, [script, fixture.uri(exportName)]);
    assert.equal(result.code, 0, `${exportName}: exit ${result.code}\n${result.stdout}\n${result.stderr}`);
    const lines = result.stdout.trim().split("\n");
    const failures = lines.filter((line) => !/^(ok |note |== |export |context )/.test(line));
    assert.deepEqual(failures, [], `${exportName}:\n${result.stdout}`);
    assert.equal(lines.filter((line) => line.startsWith("== ")).length, 2, "both reply modes ran");
    assert.ok(lines.includes("ok   done"), result.stdout);
    const modes = lines.filter((line) => line.startsWith("== ")).map((line) => line.split(" ")[1]);
    assert.deepEqual(modes, ["structured=True", "structured=False"]);
  }
});

test("qemu-io writes, zeroes, FUA-writes and discards; reads back the patterns", async (t) => {
  const skip = missingTools("qemu-io");
  if (skip) return t.skip(skip);
  for (const exportName of ["mem", "file"]) {
    const output = await runOk("qemu-io", [
      "-f",
      "raw",
      fixture.uri(exportName),
      ...["-c", "write -P 0xaa 0 1M", "-c", "read -P 0xaa 0 1M"],
      ...["-c", "write -z 1M 1M", "-c", "read -P 0 1M 1M"],
      ...["-c", "write -f -P 0x55 2M 64k", "-c", "read -P 0x55 2M 64k"],
      ...["-c", "discard 4M 1M", "-c", "flush"],
      ...["-c", "aio_write -P 0x66 8M 4k", "-c", "aio_flush", "-c", "read -P 0x66 8M 4k"],
      ...["-c", "write -P 0x11 3M 4k", "-c", "read -P 0x11 3M 4k", "-c", "read -P 0x55 2M 64k"],
    ]);
    assert.doesNotMatch(output, /Pattern verification failed|error|failed/i, output);
    assert.equal(output.match(/^read /gm)?.length, 6, output);
  }
  const refused = await run("qemu-io", ["-f", "raw", fixture.uri("ro"), "-c", "write -P 1 0 4k"]);
  assert.match(`${refused.stdout}${refused.stderr}`, /Operation not permitted|read-only|Permission denied/i);
});

test("qemu-img compare finds the file export identical to its file, and a difference after a write", async (t) => {
  const skip = missingTools("qemu-img", "qemu-io");
  if (skip) return t.skip(skip);
  const copy = join(fixture.directory, "copy.img");
  await runOk("qemu-io", ["-f", "raw", fixture.uri("file"), "-c", "write -P 0x42 5M 12k"]);
  await writeFile(copy, await readFile(filePath));
  const same = await run("qemu-img", ["compare", "-f", "raw", "-F", "raw", fixture.uri("file"), copy]);
  assert.equal(same.code, 0, same.stdout + same.stderr);
  assert.match(same.stdout, /Images are identical/);
  await runOk("qemu-io", ["-f", "raw", fixture.uri("file"), "-c", "write -P 0x43 7M 512"]);
  const different = await run("qemu-img", ["compare", "-f", "raw", "-F", "raw", fixture.uri("file"), copy]);
  assert.equal(different.code, 1, different.stdout + different.stderr);
  assert.match(different.stdout, /Content mismatch at offset 7340032/);
});

test("nbdcopy -C 4 copies the file export to a file byte for byte, and a file into the memory export", async (t) => {
  const skip = missingTools("nbdcopy");
  if (skip) return t.skip(skip);
  const target = join(fixture.directory, "nbdcopy.img");
  await runOk("nbdcopy", ["-C", "4", fixture.uri("file"), target]);
  assert.ok(
    (await readFile(target)).equals(await readFile(filePath)),
    "nbdcopy output differs from the file",
  );
  const upload = randomBytes(32 * mib);
  const source = join(fixture.directory, "upload.img");
  await writeFile(source, upload);
  const copyBack = join(fixture.directory, "back.img");
  await runOk("nbdcopy", ["-C", "4", "--flush", source, fixture.uri("mem")]);
  await runOk("nbdcopy", ["-C", "4", fixture.uri("mem"), copyBack]);
  assert.ok((await readFile(copyBack)).equals(upload), "the round trip through the memory export differs");
});

test("fio --ioengine=nbd randwrite with verify=crc32c reports no errors", async (t) => {
  const skip = missingTools("fio");
  if (skip) return t.skip(skip);
  const output = join(fixture.directory, "fio.json");
  for (const exportName of ["mem", "file"]) {
    const result = await run(
      "fio",
      [
        "--name=verify",
        "--ioengine=nbd",
        `--uri=${fixture.uri(exportName)}`,
        "--rw=randwrite",
        "--bs=4k",
        "--iodepth=16",
        "--size=8M",
        "--verify=crc32c",
        "--do_verify=1",
        "--verify_fatal=1",
        // Verify while writing: with time_based the separate verify phase would never start.
        "--verify_backlog=256",
        "--verify_state_save=0",
        "--runtime=2",
        "--time_based",
        "--output-format=json",
        `--output=${output}`,
      ],
      { timeoutMs: 60_000 },
    );
    assert.equal(
      result.code,
      0,
      `${exportName}: fio exited ${result.code}\n${result.stdout}\n${result.stderr}`,
    );
    // fio may print warnings before the JSON document.
    const text = await readFile(output, "utf8");
    const report = JSON.parse(text.slice(text.indexOf("{"))) as {
      jobs: Array<{ error: number; write: { io_bytes: number }; read: { io_bytes: number } }>;
    };
    const job = report.jobs[0]!;
    assert.equal(job.error, 0);
    assert.ok(job.write.io_bytes > 0, "fio wrote nothing");
    assert.ok(job.read.io_bytes > 0, "fio verified nothing");
  }
});

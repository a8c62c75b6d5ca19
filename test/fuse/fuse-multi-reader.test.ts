// Several /dev/fuse reader threads on one connection (FuseChannel's readerThreads): while fio writes and
// verifies (crc32c) through a loop device over one FUSE file, short-lived processes open the two FUSE
// files, read random ranges with O_DIRECT and close them again — every open registers a direct-read
// handle with every reader, every close withdraws it — and compare each range with the backing file. A
// descriptor closed while a reader could still pread it would show up as EIO, or as the other file's
// bytes once its number is reused by the next open. Afterwards no lent descriptor is left open. The
// ranges are read in one read(2) each, 4 KiB to 1 MiB: reads over 64 KiB race for the readers' shared
// allowance of large reads in place (the others go to the main thread), which is back to 0 at the end.
import assert from "node:assert/strict";
import { randomBytes } from "node:crypto";
import { readdir, readlink } from "node:fs/promises";
import { join } from "node:path";
import { test } from "node:test";
import { FuseFixture, run } from "./fuse-fixture.js";

const MiB = 1024 * 1024;
const blockBytes = 4096;
const settleTimeoutMs = 10_000;

/** Open descriptors of this process that name `path`. */
async function descriptorsOf(path: string): Promise<number> {
  let count = 0;
  for (const entry of await readdir("/proc/self/fd")) {
    const target = await readlink(`/proc/self/fd/${entry}`).catch(() => "");
    if (target === path) count += 1;
  }
  return count;
}

for (const readerThreads of [2, 3]) {
  test(`${readerThreads} reader threads: direct-read handles opened and closed in parallel with fio verify on a loop read the right bytes and leak no descriptor`, async (t) => {
    const fixture = await FuseFixture.create(t, ["fio", "dd", "cmp", "bash"], readerThreads);
    if (!fixture) return;
    assert.equal(fixture.fuseServer.readerThreads, readerThreads);
    // disk0: 0-16 MiB belong to fio, 16-32 MiB stay as written here; disk1: 8 MiB, never written.
    const disks = [
      { name: "disk0", backend: fixture.addFileExport("disk0", 32 * MiB), stableFrom: 16 * MiB },
      { name: "disk1", backend: fixture.addFileExport("disk1", 8 * MiB), stableFrom: 0 },
    ];
    for (const { backend } of disks) await backend.write(0, randomBytes(backend.sizeBytes));
    const backingPaths = disks.map(({ name }) => join(fixture.directory, `${name}.img`));
    const loop = await fixture.attachLoop("disk0");

    const fio = run("fio", [
      "--name=mix",
      `--filename=${loop}`,
      "--ioengine=libaio",
      "--direct=1",
      "--rw=randrw",
      "--bs=4k",
      "--iodepth=32",
      "--numjobs=2",
      "--size=8M",
      "--offset_increment=8M",
      "--loops=3",
      "--verify=crc32c",
      "--do_verify=1",
      "--verify_state_save=0",
      "--output-format=terse",
    ]);
    // Each pass: one open, one O_DIRECT read(2) of 1-16 blocks or, on about half the passes, of 17-256
    // (beyond 64 KiB), at a random stable block, one close.
    const script = `
      file=$1; backing=$2; first=$3; blocks=$4
      for pass in $(seq 40); do
        if ((RANDOM % 2)); then count=$((RANDOM % 16 + 1)); else count=$((RANDOM % 240 + 17)); fi
        skip=$((first + RANDOM % (blocks - count)))
        dd if="$file" bs=$((count * ${blockBytes})) skip=$((skip * ${blockBytes})) count=1 \
          iflag=direct,skip_bytes status=none |
          cmp - <(dd if="$backing" bs=${blockBytes} skip=$skip count=$count status=none) ||
          { echo "pass $pass: $count blocks at block $skip differ" >&2; exit 1; }
      done`;
    const readers = Array.from({ length: 6 }, (_, index) => {
      const disk = disks[index % disks.length]!;
      const first = disk.stableFrom / blockBytes;
      const blocks = (disk.backend.sizeBytes - disk.stableFrom) / blockBytes;
      return run("bash", [
        "-c",
        script,
        `reader-${index}`,
        fixture.filePath(disk.name),
        backingPaths[index % disks.length]!,
        String(first),
        String(blocks),
      ]);
    });
    for (const result of await Promise.all(readers)) {
      assert.equal(result.exitCode, 0, `a reader saw other bytes than the backing file: ${result.stderr}`);
    }
    const fioResult = await fio;
    assert.equal(fioResult.exitCode, 0, `fio verify failed: ${fioResult.stderr}${fioResult.stdout}`);

    // Every handle released (the loop's too, once detached): each reader acknowledged every close.
    await fixture.detachLoop(loop);
    const deadline = Date.now() + settleTimeoutMs;
    while (fixture.fuseServer.directReadDescriptors > 0 && Date.now() < deadline) {
      await new Promise((wake) => setTimeout(wake, 20));
    }
    assert.equal(fixture.fuseServer.directReadDescriptors, 0, "direct-read descriptors still lent");
    assert.equal(fixture.fuseServer.largeReadsInPlace, 0, "large reads in place still counted");
    for (const path of backingPaths) {
      assert.equal(await descriptorsOf(path), 1, `only the backend's own descriptor of ${path} is open`);
    }
  });
}

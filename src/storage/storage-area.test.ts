import { AssertionError } from "node:assert";
import assert from "node:assert/strict";
import {
  mkdirSync,
  mkdtempSync,
  readdirSync,
  readFileSync,
  readlinkSync,
  rmSync,
  statSync,
  writeFileSync,
} from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { after, test } from "node:test";
import { BlockError, type Errno } from "../block/errors.js";
import { memoryStoragePath, regionAlignmentBytes, reservedHeadBytes, StorageArea } from "./storage-area.js";

const KiB = 1024;
const MiB = 1024 * KiB;

const directory = mkdtempSync(join(tmpdir(), "blocksnap-storage-area-"));
after(() => rmSync(directory, { recursive: true, force: true }));

function isErrno(errno: Errno): (error: unknown) => boolean {
  return (error: unknown) => error instanceof BlockError && error.errno === errno;
}

test("constants: 4 KiB regions and a 4 KiB reserved head", () => {
  assert.equal(regionAlignmentBytes, 4096);
  assert.equal(reservedHeadBytes, 4096);
});

test("a memory area starts at offset 0 and hands out 4 KiB-aligned regions", () => {
  const area = StorageArea.open(memoryStoragePath, { sizeBytes: MiB, growable: true });
  assert.equal(area.kind, "memory");
  assert.equal(area.realPath, null);
  assert.equal(area.growable, true);
  assert.equal(area.capacityBytes, MiB);
  assert.equal(area.filledBytes, 0);
  assert.equal(area.tryAllocate(100), 0);
  assert.equal(area.tryAllocate(5000), 4096);
  assert.equal(area.tryAllocate(4096), 12288);
  assert.equal(area.filledBytes, 16384);
  for (let i = 0; i < 10; i++) {
    const offsetBytes = area.tryAllocate(1 + i * 777);
    assert.ok(offsetBytes !== undefined);
    assert.equal(offsetBytes % regionAlignmentBytes, 0);
  }
});

test("tryAllocate refuses a region that does not fit and changes nothing", () => {
  const area = StorageArea.open(memoryStoragePath, { sizeBytes: 16 * KiB, growable: false });
  assert.equal(area.tryAllocate(10 * KiB), 0);
  const filledBytes = area.filledBytes;
  // 12 KiB would start at 12 KiB (aligned) and end past 16 KiB.
  assert.equal(area.tryAllocate(5 * KiB), undefined);
  assert.equal(area.filledBytes, filledBytes);
  assert.equal(area.tryAllocate(4 * KiB), 12 * KiB);
  assert.equal(area.freeBytes, 0);
  assert.equal(area.tryAllocate(1), undefined);
  assert.throws(() => area.tryAllocate(0), AssertionError);
});

test("an existing regular file is used at its size with a reserved head", async () => {
  const path = join(directory, "existing.diff");
  writeFileSync(path, new Uint8Array(64 * KiB).fill(0xaa));
  const area = StorageArea.open(path, { growable: true });
  assert.equal(area.kind, "file");
  assert.equal(area.realPath, path);
  assert.equal(area.capacityBytes, 64 * KiB);
  assert.equal(area.filledBytes, reservedHeadBytes);
  const offsetBytes = area.tryAllocate(8 * KiB);
  assert.equal(offsetBytes, 8 * KiB, "regions are aligned to their size, past the reserved head");
  await area.device.write(offsetBytes, new Uint8Array(8 * KiB).fill(0x11));
  await area.close();
  const content = readFileSync(path);
  // The head is never written.
  assert.ok(content.subarray(0, reservedHeadBytes).every((byte) => byte === 0xaa));
  assert.ok(content.subarray(8 * KiB, 16 * KiB).every((byte) => byte === 0x11));
});

test("an absent file is created (empty, or at the given size) and grows on demand", async () => {
  const emptyPath = join(directory, "absent-empty.diff");
  const empty = StorageArea.open(emptyPath, { growable: true });
  assert.equal(empty.kind, "file");
  assert.equal(statSync(emptyPath).size, 0);
  assert.equal(empty.capacityBytes, 0);
  assert.equal(empty.tryAllocate(1), undefined);
  await empty.grow(MiB);
  assert.equal(statSync(emptyPath).size, MiB);
  assert.equal(empty.capacityBytes, MiB);
  assert.equal(empty.tryAllocate(1), reservedHeadBytes);
  await empty.close();

  const sizedPath = join(directory, "absent-sized.diff");
  const sized = StorageArea.open(sizedPath, { sizeBytes: 2 * MiB, growable: false });
  assert.equal(statSync(sizedPath).size, 2 * MiB);
  assert.equal(sized.capacityBytes, 2 * MiB);
  await assert.rejects(sized.grow(3 * MiB), AssertionError);
  await sized.close();
});

test("growth must add capacity", async () => {
  const area = StorageArea.open(memoryStoragePath, { sizeBytes: MiB, growable: true });
  await assert.rejects(area.grow(MiB), AssertionError);
  await assert.rejects(area.grow(KiB), AssertionError);
  await area.grow(2 * MiB);
  assert.equal(area.capacityBytes, 2 * MiB);
  await area.close();
});

/** Open file descriptors of this process whose target lies in `inDirectory`. */
function openFdsIn(inDirectory: string): string[] {
  const found: string[] = [];
  for (const fd of readdirSync("/proc/self/fd")) {
    try {
      const target = readlinkSync(`/proc/self/fd/${fd}`);
      if (target.startsWith(`${inDirectory}/`)) found.push(fd);
    } catch {
      // The descriptor of readdir itself is gone by now.
    }
  }
  return found;
}

test("a directory gets an anonymous temp file: no entry appears, its space goes at close", async () => {
  const storageDirectory = join(directory, "tmpfile-dir");
  mkdirSync(storageDirectory);
  const area = StorageArea.open(storageDirectory, { sizeBytes: MiB, growable: true });
  assert.equal(area.kind, "directory");
  assert.equal(area.realPath, storageDirectory);
  assert.equal(area.capacityBytes, MiB);
  assert.equal(area.filledBytes, reservedHeadBytes);
  assert.deepEqual(readdirSync(storageDirectory), []);
  const offsetBytes = area.tryAllocate(MiB / 2);
  assert.equal(offsetBytes, MiB / 2, "a region starts on a boundary of its own size");
  await area.device.write(offsetBytes, new Uint8Array(MiB / 2).fill(7));
  await area.grow(4 * MiB);
  const back = new Uint8Array(MiB / 2);
  await area.device.read(offsetBytes, back);
  assert.ok(back.every((byte) => byte === 7));
  assert.deepEqual(readdirSync(storageDirectory), []);
  // The file lives only through our descriptor: no name links to it, and it holds the data written.
  const fds = openFdsIn(storageDirectory);
  assert.equal(fds.length, 1);
  const stat = statSync(`/proc/self/fd/${fds[0]}`);
  assert.equal(stat.nlink, 0);
  assert.equal(stat.size, 4 * MiB);
  assert.ok(stat.blocks * 512 >= MiB / 2, `${stat.blocks} blocks allocated`);
  await area.close();
  // With its last descriptor closed an unlinked inode is freed by the kernel.
  assert.deepEqual(openFdsIn(storageDirectory), []);
  assert.deepEqual(readdirSync(storageDirectory), []);
});

test("a path that is neither file, directory nor block device is refused with EINVAL", () => {
  assert.throws(() => StorageArea.open("/dev/null", { growable: true }), isErrno("EINVAL"));
});

test("a file in a missing directory cannot be created", () => {
  assert.throws(
    () => StorageArea.open(join(directory, "missing", "x.diff"), { growable: true }),
    isErrno("ENOENT"),
  );
});

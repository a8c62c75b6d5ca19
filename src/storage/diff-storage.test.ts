import assert from "node:assert/strict";
import { execFile } from "node:child_process";
import { mkdirSync, mkdtempSync, readdirSync, readFileSync, rmSync, statSync, writeFileSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { after, test } from "node:test";
import { promisify } from "node:util";
import { BlockError, type Errno } from "../block/errors.js";
import { FaultDevice } from "../block/fault-device.js";
import { DiffStorage, type StorageEvent, type StorageLocation } from "./diff-storage.js";
import {
  memoryStoragePath,
  regionAlignmentBytes,
  regionAlignmentFor,
  reservedHeadBytes,
} from "./storage-area.js";

const execFileAsync = promisify(execFile);
const KiB = 1024;
const MiB = 1024 * KiB;
const portionBytes = MiB;
const chunkBytes = 64 * KiB;
/** Where the first chunk lands on file and device kinds: past the reserved head, on a chunk boundary. */
const firstRegionBytes = Math.max(reservedHeadBytes, regionAlignmentFor(chunkBytes));

const directory = mkdtempSync(join(tmpdir(), "blocksnap-diff-storage-"));
const loopDevices: string[] = [];
after(async () => {
  for (const loopDevice of loopDevices) await execFileAsync("losetup", ["-d", loopDevice]);
  rmSync(directory, { recursive: true, force: true });
});

function isErrno(errno: Errno): (error: unknown) => boolean {
  return (error: unknown) => error instanceof BlockError && error.errno === errno;
}

function recordingStorage(
  path: string,
  limitBytes: number,
): { storage: DiffStorage; events: StorageEvent[] } {
  const events: StorageEvent[] = [];
  const storage = new DiffStorage({
    path,
    limitBytes,
    growthPortionBytes: portionBytes,
    onEvent: (event) => events.push(event),
  });
  return { storage, events };
}

/** Allocates chunks until ENOSPC; returns the locations. Bounded by `maxChunks`. */
async function fill(storage: DiffStorage, maxChunks: number): Promise<StorageLocation[]> {
  const locations: StorageLocation[] = [];
  for (let i = 0; i < maxChunks; i++) {
    try {
      locations.push(await storage.allocate(chunkBytes));
    } catch (error) {
      assert.ok(error instanceof BlockError && error.errno === "ENOSPC", String(error));
      return locations;
    }
  }
  assert.fail(`still not full after ${maxChunks} chunks`);
}

function pattern(lengthBytes: number, seed: number): Uint8Array {
  return new Uint8Array(lengthBytes).map((_, i) => (i * 7 + seed * 13 + 1) & 0xff);
}

test("memory storage grows in portions, one low_space per crossing, one no_space at the limit", async () => {
  const limitBytes = 4 * MiB;
  const { storage, events } = recordingStorage(memoryStoragePath, limitBytes);
  // Created with its first portion.
  assert.equal(storage.capacityBytes, portionBytes);
  assert.equal(storage.info().kind, "memory");
  const locations = await fill(storage, 1000);
  // Memory has no reserved head: 4 MiB hold exactly 64 chunks of 64 KiB.
  assert.equal(locations.length, limitBytes / chunkBytes);
  assert.equal(storage.capacityBytes, limitBytes);
  assert.equal(storage.usedBytes, limitBytes);
  assert.equal(storage.freeBytes, 0);
  // A crossing below half a portion happens in each of the 4 portions (the first three then grow).
  const lowSpace = events.filter((event) => event.type === "low_space");
  const noSpace = events.filter((event) => event.type === "no_space");
  assert.equal(lowSpace.length, 4);
  for (const event of lowSpace) assert.ok(event.freeBytes < portionBytes / 2, JSON.stringify(event));
  assert.equal(noSpace.length, 1);
  assert.ok(noSpace[0]!.requestedBytes > storage.capacityBytes, JSON.stringify(noSpace[0]));
  // Further attempts fail with ENOSPC and emit nothing new.
  const eventCount = events.length;
  await assert.rejects(storage.allocate(chunkBytes), isErrno("ENOSPC"));
  await assert.rejects(storage.allocate(4096), isErrno("ENOSPC"));
  assert.equal(events.length, eventCount);
  assert.equal(storage.capacityBytes, limitBytes);
});

test("growth happens only when free space drops below half a portion, and is capped at the limit", async () => {
  const limitBytes = 2 * MiB + 512 * KiB;
  const { storage, events } = recordingStorage(memoryStoragePath, limitBytes);
  const seenCapacities = new Set<number>([storage.capacityBytes]);
  let previousCapacity = storage.capacityBytes;
  for (let i = 0; i < 1000; i++) {
    const freeBefore = storage.freeBytes;
    let location: StorageLocation;
    try {
      location = await storage.allocate(chunkBytes);
    } catch (error) {
      assert.ok(isErrno("ENOSPC")(error));
      break;
    }
    assert.equal(location.offsetBytes % regionAlignmentBytes, 0);
    if (storage.capacityBytes !== previousCapacity) {
      // Grown right after the allocation that left less than half a portion free.
      assert.ok(freeBefore - chunkBytes < portionBytes / 2, `grew with ${freeBefore - chunkBytes} free`);
      assert.equal(storage.capacityBytes, Math.min(previousCapacity + portionBytes, limitBytes));
      previousCapacity = storage.capacityBytes;
      seenCapacities.add(previousCapacity);
    }
    assert.ok(storage.capacityBytes <= limitBytes);
  }
  assert.deepEqual([...seenCapacities], [MiB, 2 * MiB, limitBytes]);
  assert.equal(events.filter((event) => event.type === "no_space").length, 1);
});

test("a large allocation grows the storage at once if the limit allows", async () => {
  const { storage, events } = recordingStorage(memoryStoragePath, 16 * MiB);
  const location = await storage.allocate(3 * MiB);
  assert.equal(location.offsetBytes, 0);
  assert.ok(storage.capacityBytes >= 3 * MiB && storage.capacityBytes <= 16 * MiB);
  assert.equal(events.filter((event) => event.type === "no_space").length, 0);
  await assert.rejects(storage.allocate(20 * MiB), isErrno("ENOSPC"));
  assert.equal(events.filter((event) => event.type === "no_space").length, 1);
  const noSpace = events.find((event) => event.type === "no_space");
  assert.ok(noSpace && noSpace.type === "no_space" && noSpace.requestedBytes > storage.capacityBytes);
});

test("appending a memory area makes allocation work again and re-arms the events", async () => {
  const { storage, events } = recordingStorage(memoryStoragePath, 2 * MiB);
  const firstLocations = await fill(storage, 1000);
  assert.equal(firstLocations.length, 32);
  assert.deepEqual(
    events.map((event) => event.type),
    ["low_space", "low_space", "no_space"],
  );
  const area = storage.append(memoryStoragePath, 2 * MiB);
  assert.equal(area.kind, "memory");
  assert.equal(area.growable, false);
  assert.equal(storage.capacityBytes, 4 * MiB);
  assert.deepEqual(storage.paths, [memoryStoragePath, memoryStoragePath]);
  const more = await fill(storage, 1000);
  assert.equal(more.length, 32);
  for (const location of more) assert.equal(location.area, area);
  // One new crossing, and the first area cannot grow: low_space then no_space again.
  assert.deepEqual(
    events.map((event) => event.type),
    ["low_space", "low_space", "no_space", "low_space", "no_space"],
  );
});

test("appending a file (created at the given size) makes allocation work again", async () => {
  const { storage, events } = recordingStorage(memoryStoragePath, MiB);
  assert.equal((await fill(storage, 1000)).length, 16);
  assert.equal(events.filter((event) => event.type === "no_space").length, 1);
  const path = join(directory, "appended.diff");
  const area = storage.append(path, 2 * MiB);
  assert.equal(area.kind, "file");
  assert.equal(statSync(path).size, 2 * MiB);
  assert.deepEqual(storage.realPaths, [path]);
  const location = await storage.allocate(chunkBytes);
  assert.equal(location.area, area);
  assert.equal(location.offsetBytes, firstRegionBytes);
  await storage.write(location, 0, pattern(chunkBytes, 4));
  const back = new Uint8Array(chunkBytes);
  await storage.read(location, 0, back);
  assert.deepEqual(back, pattern(chunkBytes, 4));
  const rest = await fill(storage, 1000);
  assert.equal(rest.length, Math.floor((2 * MiB - firstRegionBytes) / chunkBytes) - 1);
  // The exhausted file re-armed the events: a second no_space.
  assert.equal(events.filter((event) => event.type === "no_space").length, 2);
  await storage.close();
});

test("appending an area with no usable space is refused with EINVAL and changes nothing", async () => {
  const { storage } = recordingStorage(memoryStoragePath, 2 * MiB);
  const before = storage.info();
  assert.throws(() => storage.append(memoryStoragePath, 0), isErrno("EINVAL"));
  // A file no larger than the reserved head holds nothing.
  const tinyPath = join(directory, "tiny.diff");
  writeFileSync(tinyPath, new Uint8Array(reservedHeadBytes));
  assert.throws(() => storage.append(tinyPath, reservedHeadBytes), isErrno("EINVAL"));
  assert.deepEqual(storage.info(), before);
  await storage.close();
});

test("an absent file is created and grown in portions; an existing one is used at its size", async () => {
  const absentPath = join(directory, "absent.diff");
  const { storage, events } = recordingStorage(absentPath, 3 * MiB);
  assert.equal(storage.info().kind, "file");
  assert.equal(statSync(absentPath).size, portionBytes);
  const locations = await fill(storage, 1000);
  // The reserved head costs one chunk's worth of alignment: 3 MiB - 4 KiB holds 47 chunks of 64 KiB.
  assert.equal(locations[0]!.offsetBytes, firstRegionBytes);
  assert.equal(locations.length, Math.floor((3 * MiB - firstRegionBytes) / chunkBytes));
  assert.equal(statSync(absentPath).size, 3 * MiB);
  assert.equal(events.filter((event) => event.type === "no_space").length, 1);
  await storage.close();

  const existingPath = join(directory, "existing.diff");
  writeFileSync(existingPath, new Uint8Array(2 * MiB));
  const existing = recordingStorage(existingPath, 64 * MiB);
  // Larger than half a portion: used as it is.
  assert.equal(existing.storage.capacityBytes, 2 * MiB);
  assert.equal(statSync(existingPath).size, 2 * MiB);
  assert.equal((await existing.storage.allocate(chunkBytes)).offsetBytes, firstRegionBytes);
  assert.deepEqual(existing.storage.realPaths, [existingPath]);
  await existing.storage.close();
});

test("data round-trips through locations in memory, file and temp-file areas", async () => {
  const storageDirectory = join(directory, "roundtrip-dir");
  mkdirSync(storageDirectory);
  // The limit bounds the total capacity, appended areas included.
  const { storage } = recordingStorage(memoryStoragePath, 8 * MiB);
  storage.append(join(directory, "roundtrip-file.diff"), 2 * MiB);
  storage.append(storageDirectory, 2 * MiB);
  assert.equal(storage.info().kind, "mixed");
  const first = await storage.allocate(MiB / 4);
  const written: Array<[StorageLocation, Uint8Array]> = [[first, pattern(MiB / 4, 1)]];
  // Enough regions to spill from the growing memory area into the appended file and temp file.
  for (let i = 0; i < 12; i++) {
    written.push([await storage.allocate(MiB / 2), pattern(MiB / 2, 20 + i)]);
  }
  for (const [location, data] of written) await storage.write(location, 0, data);
  // A write inside a region at an offset.
  const [patchLocation, patchData] = written[1]!;
  const patch = pattern(100, 99);
  await storage.write(patchLocation, 1000, patch);
  patchData.set(patch, 1000);
  await storage.flush();
  for (const [location, data] of written) {
    const back = new Uint8Array(data.byteLength);
    await storage.read(location, 0, back);
    assert.deepEqual(back, data);
    const middle = new Uint8Array(10);
    await storage.read(location, 500, middle);
    assert.deepEqual(middle, data.subarray(500, 510));
  }
  const kinds = new Set(written.map(([location]) => location.area.kind));
  assert.deepEqual([...kinds].sort(), ["directory", "file", "memory"]);
  // The temp file in the directory left no name behind.
  assert.deepEqual(readdirSync(storageDirectory), []);
  await storage.close();
});

test("a directory storage leaves no directory entry and grows its temp file", async () => {
  const storageDirectory = join(directory, "tmpfile-storage");
  mkdirSync(storageDirectory);
  const { storage, events } = recordingStorage(storageDirectory, 2 * MiB);
  assert.equal(storage.info().kind, "directory");
  const locations = await fill(storage, 1000);
  assert.equal(locations.length, Math.floor((2 * MiB - firstRegionBytes) / chunkBytes));
  assert.equal(storage.capacityBytes, 2 * MiB);
  assert.equal(events.filter((event) => event.type === "no_space").length, 1);
  await storage.write(locations.at(-1)!, 0, pattern(chunkBytes, 5));
  assert.deepEqual(readdirSync(storageDirectory), []);
  await storage.close();
  assert.deepEqual(readdirSync(storageDirectory), []);
});

test("a closed storage fails every operation with EIO", async () => {
  const { storage } = recordingStorage(memoryStoragePath, 4 * MiB);
  const location = await storage.allocate(chunkBytes);
  await storage.close();
  await storage.close();
  await assert.rejects(storage.allocate(chunkBytes), isErrno("EIO"));
  await assert.rejects(storage.read(location, 0, new Uint8Array(1)), isErrno("EIO"));
  await assert.rejects(storage.write(location, 0, new Uint8Array(1)), isErrno("EIO"));
  await assert.rejects(storage.flush(), isErrno("EIO"));
  assert.throws(() => storage.append(memoryStoragePath, MiB), isErrno("EIO"));
});

test("a block device is used whole and never grows", async (t) => {
  if (process.getuid?.() !== 0) {
    t.skip("needs root to attach a loop device");
    return;
  }
  const imagePath = join(directory, "loop-backing.img");
  const deviceSizeBytes = 2 * MiB;
  writeFileSync(imagePath, new Uint8Array(deviceSizeBytes).fill(0xee));
  let loopDevice: string;
  try {
    const { stdout } = await execFileAsync("losetup", ["-f", "--show", imagePath]);
    loopDevice = stdout.trim();
  } catch (error) {
    t.skip(`losetup -f --show failed: ${String(error)}`);
    return;
  }
  loopDevices.push(loopDevice);
  const { storage, events } = recordingStorage(loopDevice, 64 * MiB);
  assert.equal(storage.info().kind, "block-device");
  assert.equal(storage.capacityBytes, deviceSizeBytes);
  const locations = await fill(storage, 1000);
  assert.equal(locations[0]!.offsetBytes, firstRegionBytes);
  assert.equal(locations.length, Math.floor((deviceSizeBytes - firstRegionBytes) / chunkBytes));
  assert.equal(storage.capacityBytes, deviceSizeBytes);
  assert.equal(events.filter((event) => event.type === "low_space").length, 1);
  assert.equal(events.filter((event) => event.type === "no_space").length, 1);
  await assert.rejects(storage.allocate(chunkBytes), isErrno("ENOSPC"));
  for (const [index, location] of locations.entries()) {
    await storage.write(location, 0, pattern(chunkBytes, index));
  }
  await storage.flush();
  const back = new Uint8Array(chunkBytes);
  await storage.read(locations[5]!, 0, back);
  assert.deepEqual(back, pattern(chunkBytes, 5));
  await storage.close();
  // Through the loop device onto its backing file: data at the locations, the head never written.
  const backing = readFileSync(imagePath);
  assert.equal(backing.byteLength, deviceSizeBytes);
  assert.ok(backing.subarray(0, reservedHeadBytes).every((byte) => byte === 0xee));
  const lastIndex = locations.length - 1;
  const lastOffset = locations[lastIndex]!.offsetBytes;
  assert.deepEqual(
    new Uint8Array(backing.subarray(lastOffset, lastOffset + chunkBytes)),
    pattern(chunkBytes, lastIndex),
  );
});

test("a region whose write failed is released and reused; io_error reports the errno once until a write succeeds", async () => {
  const events: StorageEvent[] = [];
  const storage = new DiffStorage({
    path: "memory:",
    limitBytes: 64 * MiB,
    growthPortionBytes: 16 * MiB,
    onEvent: (event) => events.push(event),
    areaStage: (device) =>
      new FaultDevice(device, { rules: [{ operations: ["write"], errno: "ENOSPC", count: 3 }] }),
  });
  const usedBefore = storage.usedBytes;
  for (let attempt = 0; attempt < 3; attempt++) {
    const location = await storage.allocate(chunkBytes);
    await assert.rejects(storage.write(location, 0, pattern(chunkBytes, attempt)), isErrno("ENOSPC"));
    storage.release(location, chunkBytes);
    assert.equal(storage.usedBytes, usedBefore, "a released region is not counted as used");
  }
  const ioErrors = events.filter((event) => event.type === "io_error");
  assert.equal(ioErrors.length, 1, "one io_error per errno");
  assert.equal(ioErrors[0]?.type === "io_error" && ioErrors[0].errno, "ENOSPC");
  const location = await storage.allocate(chunkBytes);
  assert.equal(storage.usedBytes, usedBefore + chunkBytes);
  await storage.write(location, 0, pattern(chunkBytes, 9));
  const check = new Uint8Array(chunkBytes);
  await storage.read(location, 0, check);
  assert.deepEqual(check, pattern(chunkBytes, 9));
  await storage.close();
});

test("chunk data is best handed over in shared memory to a file storage, not to a RAM one", async () => {
  const memory = new DiffStorage({ path: memoryStoragePath, limitBytes: 4 * MiB, growthPortionBytes: MiB });
  const file = new DiffStorage({ path: directory, limitBytes: 4 * MiB, growthPortionBytes: MiB });
  try {
    assert.equal(memory.prefersSharedSources, false);
    assert.equal(file.prefersSharedSources, true);
    // A RAM storage with a file appended has a writer thread to hand the data to.
    memory.append(join(directory, "appended-for-shared-sources.img"), MiB);
    assert.equal(memory.prefersSharedSources, true);
    // Data written from shared memory reads back the same (the writer writes it by reference).
    const source = new Uint8Array(new SharedArrayBuffer(chunkBytes)).fill(0x5a);
    const location = await file.allocate(chunkBytes);
    await file.write(location, 0, source);
    const target = new Uint8Array(chunkBytes);
    await file.read(location, 0, target);
    assert.deepEqual(target, new Uint8Array(chunkBytes).fill(0x5a));
  } finally {
    await memory.close();
    await file.close();
  }
});

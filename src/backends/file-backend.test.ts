import assert from "node:assert/strict";
import { execFile } from "node:child_process";
import { mkdtempSync, rmSync, statSync, writeFileSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { after, test } from "node:test";
import { BlockError } from "../block/errors.js";
import {
  asyncIoBytesMin,
  blockDeviceSizeBytes,
  FileBackend,
  poolProbeEvery,
  slowReadMicrosOf,
} from "./file-backend.js";
import { batchBytesMax, FileSystemWriter } from "./fs-writer.js";

const directory = mkdtempSync(join(tmpdir(), "blocksnap-file-backend-"));
after(() => rmSync(directory, { recursive: true, force: true }));

test("FileBackend creates a file of the given size and round-trips data", async () => {
  const path = join(directory, "disk0.img");
  const backend = FileBackend.open(path, { sizeBytes: 1 << 20 });
  assert.equal(backend.sizeBytes, 1 << 20);
  assert.equal(statSync(path).size, 1 << 20);
  await backend.write(4096, new Uint8Array([1, 2, 3]), { fua: true });
  await backend.writeZeroes(4097, 1);
  const target = new Uint8Array(4);
  await backend.read(4095, target);
  assert.deepEqual([...target], [0, 1, 0, 3]);
  await backend.flush();
  await backend.close();
  await assert.rejects(
    backend.read(0, new Uint8Array(1)),
    (e: unknown) => e instanceof BlockError && e.errno === "EIO",
  );
});

test("FileBackend: large reads run synchronously while they come from memory, in the pool while the device is slow", async () => {
  const path = join(directory, "slow-read.img");
  const sizeBytes = 4 * asyncIoBytesMin;
  const content = Buffer.alloc(sizeBytes);
  for (let index = 0; index < sizeBytes; index += 1) content[index] = (index * 7 + 3) & 0xff;
  writeFileSync(path, content);
  // A clock the test moves: every call returns `nowMs` and then adds `stepMs`, so a synchronous read
  // (one call before, one after) lasts exactly `stepMs`.
  let nowMs = 1000;
  let stepMs = 0;
  const clock = () => {
    const value = nowMs;
    nowMs += stepMs;
    return value;
  };
  const slowMs = (slowReadMicrosOf(asyncIoBytesMin) + 1) / 1000;
  const fastMs = (slowReadMicrosOf(asyncIoBytesMin) - 1) / 1000;
  const backend = FileBackend.open(path, { clock });
  let readsDone = 0;
  const read = async (lengthBytes = asyncIoBytesMin, durationMs = 0) => {
    const offsetBytes = (readsDone * 4099) % (sizeBytes - lengthBytes);
    readsDone += 1;
    stepMs = durationMs;
    const target = Buffer.alloc(lengthBytes);
    await backend.read(offsetBytes, target);
    stepMs = 0;
    assert.ok(target.equals(content.subarray(offsetBytes, offsetBytes + lengthBytes)), "the file's bytes");
  };
  // Page-cache reads with one in four preempted (slow): never the pool, however many.
  for (let index = 0; index < 400; index += 1) await read(asyncIoBytesMin, index % 4 === 0 ? slowMs : fastMs);
  await Promise.all([read(), read(2 * asyncIoBytesMin), read(100)]);
  assert.equal(backend.largeReadsSentToPool, 0, "occasional slow reads do not leave the synchronous path");
  // A cold device: every synchronous read is slow. After a few (not one) large reads go to the pool.
  let slowReads = 0;
  while (backend.largeReadsSentToPool === 0 && slowReads < 64) {
    await Promise.all([read(asyncIoBytesMin, slowMs), read(asyncIoBytesMin, slowMs)]);
    slowReads += 2;
  }
  assert.ok(slowReads > 2 && slowReads < 32, `switched to the pool after ${slowReads} slow reads`);
  // In the pool, small reads stay synchronous; one large read in poolProbeEvery is a synchronous probe.
  const inPool = backend.largeReadsSentToPool;
  await Promise.all([read(), read(3 * asyncIoBytesMin), read(4096)]);
  assert.equal(backend.largeReadsSentToPool, inPool + 2);
  // Still slow: the probes keep it in the pool.
  const beforeSlowProbes = backend.largeReadsSentToPool;
  for (let index = 0; index < 4 * poolProbeEvery; index += 1) await read(asyncIoBytesMin, slowMs);
  assert.equal(
    backend.largeReadsSentToPool - beforeSlowProbes,
    4 * poolProbeEvery - 4,
    "one in poolProbeEvery probed",
  );
  // Fast probes bring it back to the synchronous path.
  let probes = 0;
  let readsInPool = 0;
  while (readsInPool < 100 * poolProbeEvery) {
    const before: number = backend.largeReadsSentToPool;
    await read(asyncIoBytesMin, fastMs);
    if (backend.largeReadsSentToPool === before) {
      probes += 1;
      const afterProbe: number = backend.largeReadsSentToPool;
      await read(asyncIoBytesMin, fastMs);
      if (backend.largeReadsSentToPool === afterProbe) break;
      readsInPool += 1;
    } else {
      readsInPool += 1;
    }
  }
  assert.ok(probes > 2 && probes < 100, `back on the synchronous path after ${probes} fast probes`);
  await backend.close();
});

test("FileBackend uses an existing file at its size and refuses what is not a file or block device", async () => {
  const path = join(directory, "existing.img");
  writeFileSync(path, new Uint8Array(8192).fill(5));
  const backend = FileBackend.open(path);
  assert.equal(backend.sizeBytes, 8192);
  await backend.close();
  assert.throws(
    () => FileBackend.open(directory),
    (e: unknown) => e instanceof BlockError && e.errno === "EINVAL",
  );
  assert.throws(
    () => FileBackend.open(join(directory, "absent.img")),
    (e: unknown) => e instanceof BlockError && e.errno === "ENOENT",
  );
});

test("FileBackend opens a block device exclusively, sized from sysfs", async (t) => {
  if (process.getuid?.() !== 0) return t.skip("needs root for losetup");
  const backing = join(directory, "loop-backing.img");
  writeFileSync(backing, new Uint8Array(8 * 1024 * 1024));
  const loop = await new Promise<string>((resolve, reject) =>
    execFile("losetup", ["-f", "--show", backing], (error, stdout) =>
      error ? reject(error) : resolve(stdout.trim()),
    ),
  ).catch((error: unknown) => String(error));
  if (!loop.startsWith("/dev/")) return t.skip(`losetup failed: ${loop}`);
  try {
    const backend = FileBackend.open(loop);
    assert.equal(backend.kind, "block-device");
    assert.equal(backend.sizeBytes, 8 * 1024 * 1024);
    assert.equal(blockDeviceSizeBytes(loop), 8 * 1024 * 1024);
    assert.throws(
      () => FileBackend.open(loop),
      (e: unknown) => e instanceof BlockError && e.errno === "EBUSY",
    );
    assert.throws(
      () => FileBackend.open(loop, { sizeBytes: 4096 }),
      (e: unknown) => e instanceof BlockError && e.errno === "EINVAL",
    );
    await backend.write(8 * 1024 * 1024 - 4096, new Uint8Array(4096).fill(0x5c), { fua: true });
    const target = new Uint8Array(4096);
    await backend.read(8 * 1024 * 1024 - 4096, target);
    assert.ok(target.every((byte) => byte === 0x5c));
    await backend.close();
  } finally {
    await new Promise((resolve) => execFile("losetup", ["-d", loop], resolve));
  }
});

test("FileBackend writes run on the file system's writer thread: concurrent writes, zeroes and growth in order", async () => {
  const path = join(directory, "writer.img");
  const backend = FileBackend.open(path, { sizeBytes: 1 << 20 });
  const second = FileBackend.open(join(directory, "writer2.img"), { sizeBytes: 1 << 20 });
  const writersWithBoth = FileSystemWriter.count;
  // Many writes issued in one turn form batches; overlapping ones land in issue order.
  const writes: Promise<void>[] = [];
  for (let index = 0; index < 300; index++) {
    writes.push(backend.write((index % 100) * 4096, new Uint8Array(4096).fill(index % 251)));
    writes.push(second.write(index * 1024, new Uint8Array(1024).fill(7)));
  }
  await Promise.all(writes);
  const target = new Uint8Array(4096);
  for (const slot of [0, 42, 99]) {
    await backend.read(slot * 4096, target);
    assert.ok(
      target.every((byte) => byte === (200 + slot) % 251),
      `slot ${slot} holds the last write`,
    );
  }
  await backend.writeZeroes(4096, 5 * 4096);
  await backend.read(5 * 4096, target);
  assert.ok(target.every((byte) => byte === 0));
  await backend.extend(2 << 20);
  assert.equal(statSync(path).size, 2 << 20);
  // A write larger than one batch goes alone.
  const large = new Uint8Array(batchBytesMax + 4096).fill(0x6d);
  await backend.write(0, large);
  const check = new Uint8Array(large.byteLength);
  await backend.read(0, check);
  assert.deepEqual(check, large);
  // close() waits for the writes still out.
  const pending = backend.write(8192, new Uint8Array(4096).fill(1));
  await backend.close();
  await pending;
  await second.close();
  assert.ok(writersWithBoth >= 1);
});

test("FileBackend: a failed write keeps the kernel's errno and names the file", async () => {
  const path = join(directory, "huge-offset.img");
  const backend = FileBackend.open(path, { sizeBytes: 8192 });
  // Past the largest file the file system allows (ext4: 16 TiB, tmpfs/xfs: 8 EiB - the offset is not exact).
  await assert.rejects(
    backend.write(2 ** 53 - 8192, new Uint8Array(512)),
    (e: unknown) =>
      e instanceof BlockError &&
      ["EFBIG", "EINVAL"].includes(e.errno) &&
      e.message.includes("huge-offset.img"),
  );
  await backend.write(0, new Uint8Array(512).fill(1));
  await backend.close();
});

import assert from "node:assert/strict";
import { test } from "node:test";
import { ChunkLogWriter, chunkRecordBytes, decodeChunkLog } from "./chunk-log.js";
import type { PersistFile } from "./persist-file.js";

/** A PersistFile in memory that records which writes were synced (what a host crash may keep). */
class MemoryFile implements PersistFile {
  bytes = new Uint8Array(0);
  syncs = 0;

  async write(positionBytes: number, data: Uint8Array): Promise<void> {
    if (positionBytes + data.byteLength > this.bytes.byteLength) {
      const grown = new Uint8Array(positionBytes + data.byteLength);
      grown.set(this.bytes);
      this.bytes = grown;
    }
    this.bytes.set(data, positionBytes);
  }

  async sync(): Promise<void> {
    this.syncs++;
  }

  async readAll(): Promise<Uint8Array> {
    return this.bytes.slice();
  }

  async close(): Promise<void> {}
}

test("chunk log: records round-trip, the first record of a chunk wins, a seal and a boot are seen", async () => {
  const file = new MemoryFile();
  const writer = await ChunkLogWriter.open(file, 0, "0123456789ab-cdef-0123-4567-89abcdef0123");
  await Promise.all([
    writer.stored(0, 5, 4096),
    writer.stored(1, 7, 2 ** 45 + 8192),
    writer.stored(0, 5, 999),
  ]);
  let log = decodeChunkLog(file.bytes);
  assert.deepEqual([...(log.chunks.get(0) ?? [])], [[5, 4096]]);
  assert.deepEqual([...(log.chunks.get(1) ?? [])], [[7, 2 ** 45 + 8192]]);
  assert.equal(log.sealed, false);
  assert.equal(log.lastBoot, "0123456789abcdef01234567");
  await writer.seal();
  assert.equal(file.syncs, 2, "sync before and after the seal");
  log = decodeChunkLog(file.bytes);
  assert.equal(log.sealed, true);
  // Going on after a restart: a new boot record unseals.
  const again = await ChunkLogWriter.open(file, log.endBytes, "fedcba98-7654-3210-fedc-ba9876543210");
  await again.stored(0, 6, 8192);
  log = decodeChunkLog(file.bytes);
  assert.equal(log.sealed, false);
  assert.equal(log.lastBoot, "fedcba9876543210fedcba98");
  assert.equal(log.chunks.get(0)?.get(6), 8192);
});

test("chunk log: torn, zeroed and damaged slots are skipped without hiding the records after them", async () => {
  const file = new MemoryFile();
  const writer = await ChunkLogWriter.open(file, 0, "boot");
  for (let chunk = 0; chunk < 10; chunk++) await writer.stored(0, chunk, chunk * 65536 + 4096);
  const headerSlots = 2;
  const damaged = file.bytes.slice();
  damaged.fill(0, (headerSlots + 3) * chunkRecordBytes, (headerSlots + 4) * chunkRecordBytes);
  const flipAt = (headerSlots + 6) * chunkRecordBytes + 9;
  damaged[flipAt] = (damaged[flipAt] ?? 0) ^ 0xff;
  const torn = damaged.subarray(0, damaged.byteLength - 5);
  const log = decodeChunkLog(torn);
  assert.deepEqual(
    [...(log.chunks.get(0)?.keys() ?? [])].sort((a, b) => a - b),
    [0, 1, 2, 4, 5, 7, 8],
    "chunks 3 (zeroed) and 6 (damaged) and 9 (torn) are absent, the others kept",
  );
  assert.equal(log.invalidSlots, 2);
  assert.throws(() => decodeChunkLog(new Uint8Array(chunkRecordBytes).fill(7)), /no valid header/);
  assert.equal(decodeChunkLog(new Uint8Array(0)).chunks.size, 0);
});

/**
 * Raw-socket probes of the transmission phase (docs/design/nbd-notes.md, "Conformance"): bad flags and commands, ranges at and past the end, offsets above
 * 2^53 and at 2^63, refused WRITE payloads, DF, FAST_ZERO, BLOCK_STATUS, structured reads with holes,
 * repeated cookies, DISC with requests in flight, odd export sizes.
 */
import assert from "node:assert/strict";
import { after, before, test } from "node:test";
import { MemoryBackend } from "../../src/backends/memory-backend.js";
import type { TestServer } from "./nbd-test-helpers.js";
import { deviceExport, memoryExport, startTestServer, waitFor } from "./nbd-test-helpers.js";
import { errno, NBD_CMD, NBD_CMD_FLAG, NBD_REPLY_TYPE, RawNbdClient } from "./raw-nbd-client.js";
import { ForwardingDevice, GatedDevice, SlowZeroDevice } from "./test-devices.js";

const mib = 1024 * 1024;
const oddSizeBytes = 2 * 4096 + 1000;
let fixture: TestServer;
let holeyBackend: MemoryBackend;

before(async () => {
  holeyBackend = new MemoryBackend(4 * mib);
  // Data at [0, 64K) and [192K, 256K); holes elsewhere (MemoryBackend pages are 64 KiB).
  await holeyBackend.write(0, new Uint8Array(64 * 1024).fill(0x11));
  await holeyBackend.write(192 * 1024, new Uint8Array(64 * 1024).fill(0x22));
  const odd = new MemoryBackend(oddSizeBytes);
  await odd.write(oddSizeBytes - 100, new Uint8Array(100).fill(0x33));
  fixture = await startTestServer([
    memoryExport("disk", 8 * mib),
    memoryExport("ro", mib, true),
    deviceExport("holey", holeyBackend),
    deviceExport("odd", odd),
    deviceExport("nofast", new ForwardingDevice(new MemoryBackend(mib), { canFastZero: false })),
    deviceExport("slowzero", new SlowZeroDevice(new MemoryBackend(mib))),
  ]);
});

after(async () => {
  await fixture.close();
});

async function open(exportName: string, options: { structured?: boolean; metaContext?: boolean } = {}) {
  const client = await RawNbdClient.connect(fixture.socketPath);
  const info = await client.handshake(exportName, options);
  return { client, ...info };
}

/** The error of a simple reply or of a structured ERROR chunk (0 for success). */
async function replyError(client: RawNbdClient, cookie?: bigint): Promise<number> {
  const reply = await client.readReply();
  if (cookie !== undefined) assert.equal(reply.cookie, cookie);
  if (reply.kind === "simple") return reply.error;
  return reply.type === NBD_REPLY_TYPE.ERROR ? reply.payload.readUInt32BE(0) : 0;
}

test("a READ above the 32 MiB maximum is EINVAL with no payload; the connection stays usable", async () => {
  const { client } = await open("disk");
  client.sendRequest({ command: NBD_CMD.READ, cookie: 1n, length: 33558528 });
  assert.equal(await replyError(client, 1n), errno.EINVAL);
  client.sendRequest({ command: NBD_CMD.READ, cookie: 2n, length: 512 });
  assert.equal(await replyError(client, 2n), 0);
  assert.equal((await client.read(512)).byteLength, 512);
  client.destroy();
});

test("unknown command 9 and unknown flag 0x8000 are EINVAL; REQ_ONE/NO_HOLE on READ are EINVAL", async () => {
  const { client } = await open("disk");
  client.sendRequest({ command: 9, cookie: 1n, length: 512 });
  assert.equal(await replyError(client, 1n), errno.EINVAL);
  client.sendRequest({ command: NBD_CMD.READ, flags: 0x8000, cookie: 2n, length: 512 });
  assert.equal(await replyError(client, 2n), errno.EINVAL);
  client.sendRequest({ command: NBD_CMD.READ, flags: NBD_CMD_FLAG.REQ_ONE, cookie: 3n, length: 512 });
  assert.equal(await replyError(client, 3n), errno.EINVAL);
  client.sendRequest({ command: NBD_CMD.READ, flags: NBD_CMD_FLAG.NO_HOLE, cookie: 4n, length: 512 });
  assert.equal(await replyError(client, 4n), errno.EINVAL);
  client.sendRequest({ command: NBD_CMD.READ, cookie: 5n, length: 512 });
  assert.equal(await replyError(client, 5n), 0);
  await client.read(512);
  client.destroy();
});

test("a bad request magic after a valid READ makes the server close the connection", async () => {
  const { client } = await open("disk");
  client.sendRequest({ command: NBD_CMD.READ, cookie: 1n, length: 512 });
  assert.equal(await replyError(client, 1n), 0);
  await client.read(512);
  const bad = Buffer.alloc(28);
  bad.writeUInt32BE(0xdeadbeef, 0);
  client.write(bad);
  assert.equal(await client.waitForServerClose(), true);
  // The server itself is fine.
  const other = await open("disk");
  other.client.sendRequest({ command: NBD_CMD.FLUSH, cookie: 2n });
  assert.equal(await replyError(other.client, 2n), 0);
  other.client.destroy();
});

test("READ of zero length, past the end, straddling the end, at 2^53, 2^63 and 2^64-1 is EINVAL", async () => {
  for (const structured of [false, true]) {
    const { client, sizeBytes } = await open("disk", { structured });
    const cases: Array<[bigint, number]> = [
      [0n, 0],
      [sizeBytes, 512],
      [sizeBytes - 512n, 1024],
      [2n ** 53n, 512],
      [2n ** 53n - 1n, 1],
      [2n ** 63n, 512],
      [2n ** 64n - 1n, 1],
      [2n ** 32n, 512],
    ];
    for (const [index, [offset, length]] of cases.entries()) {
      const cookie = BigInt(index + 1) << 32n;
      client.sendRequest({ command: NBD_CMD.READ, cookie, offset, length });
      assert.equal(await replyError(client, cookie), errno.EINVAL, `READ ${offset}+${length}`);
    }
    client.sendRequest({ command: NBD_CMD.READ, cookie: 99n, offset: sizeBytes - 1n, length: 1 });
    assert.equal(await replyError(client, 99n), 0);
    if (!structured) await client.read(1);
    client.destroy();
  }
});

test("WRITE past the end is ENOSPC, its payload is skipped, and the stream stays in sync", async () => {
  const { client, sizeBytes } = await open("disk");
  const payload = Buffer.alloc(4096, 0x5a);
  client.sendRequest({ command: NBD_CMD.WRITE, cookie: 1n, offset: sizeBytes - 2048n, payload });
  assert.equal(await replyError(client, 1n), errno.ENOSPC);
  client.sendRequest({ command: NBD_CMD.WRITE, cookie: 2n, offset: 2n ** 63n, payload });
  assert.equal(await replyError(client, 2n), errno.ENOSPC);
  client.sendRequest({ command: NBD_CMD.WRITE, cookie: 3n, offset: 4096n, payload });
  assert.equal(await replyError(client, 3n), 0);
  client.sendRequest({ command: NBD_CMD.READ, cookie: 4n, offset: 4096n, length: 4096 });
  assert.equal(await replyError(client, 4n), 0);
  assert.deepEqual(await client.read(4096), payload);
  client.destroy();
});

test("WRITE, TRIM and WRITE_ZEROES on a read-only export are EPERM; the refused payload is skipped", async () => {
  const { client } = await open("ro");
  client.sendRequest({ command: NBD_CMD.WRITE, cookie: 1n, payload: Buffer.alloc(65536, 1) });
  assert.equal(await replyError(client, 1n), errno.EPERM);
  client.sendRequest({ command: NBD_CMD.TRIM, cookie: 2n, length: 4096 });
  assert.equal(await replyError(client, 2n), errno.EPERM);
  client.sendRequest({ command: NBD_CMD.WRITE_ZEROES, cookie: 3n, length: 4096 });
  assert.equal(await replyError(client, 3n), errno.EPERM);
  client.sendRequest({ command: NBD_CMD.READ, cookie: 4n, length: 4096 });
  assert.equal(await replyError(client, 4n), 0);
  assert.ok(
    (await client.read(4096)).every((byte) => byte === 0),
    "the refused write changed nothing",
  );
  client.destroy();
});

test("a WRITE above the maximum is EINVAL after its payload is skipped; one above twice the maximum disconnects", async () => {
  const { client } = await open("disk");
  const length = 32 * mib + 4096;
  client.sendRequest({ command: NBD_CMD.WRITE, cookie: 1n, payload: Buffer.alloc(length, 7) });
  assert.equal(await replyError(client, 1n), errno.EINVAL);
  client.sendRequest({ command: NBD_CMD.FLUSH, cookie: 2n });
  assert.equal(await replyError(client, 2n), 0);
  client.sendRequest({ command: NBD_CMD.WRITE, cookie: 3n, length: 0xffff_ffff });
  assert.equal(await client.waitForServerClose(), true);
});

test("FLUSH with a non-zero offset or length is EINVAL; DISC with them still disconnects", async () => {
  const { client } = await open("disk");
  client.sendRequest({ command: NBD_CMD.FLUSH, cookie: 1n, offset: 512n });
  assert.equal(await replyError(client, 1n), errno.EINVAL);
  client.sendRequest({ command: NBD_CMD.FLUSH, cookie: 2n, length: 512 });
  assert.equal(await replyError(client, 2n), errno.EINVAL);
  client.sendRequest({ command: NBD_CMD.DISC, cookie: 3n, offset: 512n, length: 1 });
  assert.equal(await client.waitForServerClose(), true);
});

test("DF without SEND_DF and FAST_ZERO without SEND_FAST_ZERO are EINVAL; FUA is accepted on any command", async () => {
  const simple = await open("disk");
  simple.client.sendRequest({ command: NBD_CMD.READ, flags: NBD_CMD_FLAG.DF, cookie: 1n, length: 512 });
  assert.equal(await replyError(simple.client, 1n), errno.EINVAL);
  simple.client.sendRequest({ command: NBD_CMD.FLUSH, flags: NBD_CMD_FLAG.FUA, cookie: 2n });
  assert.equal(await replyError(simple.client, 2n), 0);
  simple.client.destroy();
  const noFast = await open("nofast");
  const zeroFlags = NBD_CMD_FLAG.FAST_ZERO;
  noFast.client.sendRequest({ command: NBD_CMD.WRITE_ZEROES, flags: zeroFlags, cookie: 3n, length: 4096 });
  assert.equal(await replyError(noFast.client, 3n), errno.EINVAL);
  noFast.client.sendRequest({ command: NBD_CMD.WRITE_ZEROES, cookie: 4n, length: 4096 });
  assert.equal(await replyError(noFast.client, 4n), 0);
  noFast.client.destroy();
});

test("FAST_ZERO on a device that cannot zero fast is ENOTSUP; without FAST_ZERO it zeroes", async () => {
  const { client } = await open("slowzero");
  client.sendRequest({ command: NBD_CMD.WRITE, cookie: 1n, payload: Buffer.alloc(4096, 9) });
  assert.equal(await replyError(client, 1n), 0);
  client.sendRequest({
    command: NBD_CMD.WRITE_ZEROES,
    flags: NBD_CMD_FLAG.FAST_ZERO,
    cookie: 2n,
    length: 4096,
  });
  assert.equal(await replyError(client, 2n), errno.ENOTSUP);
  client.sendRequest({ command: NBD_CMD.READ, cookie: 3n, length: 4096 });
  assert.equal(await replyError(client, 3n), 0);
  assert.ok(
    (await client.read(4096)).every((byte) => byte === 9),
    "a failed fast zero must not touch data",
  );
  client.sendRequest({
    command: NBD_CMD.WRITE_ZEROES,
    flags: NBD_CMD_FLAG.NO_HOLE,
    cookie: 4n,
    length: 4096,
  });
  assert.equal(await replyError(client, 4n), 0);
  client.sendRequest({ command: NBD_CMD.READ, cookie: 5n, length: 4096 });
  assert.equal(await replyError(client, 5n), 0);
  assert.ok((await client.read(4096)).every((byte) => byte === 0));
  client.destroy();
});

test("CACHE succeeds in range and is EINVAL past the end; TRIM past the end is EINVAL", async () => {
  const { client, sizeBytes } = await open("disk");
  client.sendRequest({ command: NBD_CMD.CACHE, cookie: 1n, length: 64 * mib - 1 });
  assert.equal(await replyError(client, 1n), errno.EINVAL);
  client.sendRequest({ command: NBD_CMD.CACHE, cookie: 2n, length: Number(sizeBytes) });
  assert.equal(await replyError(client, 2n), 0);
  client.sendRequest({ command: NBD_CMD.TRIM, cookie: 3n, offset: sizeBytes, length: 1 });
  assert.equal(await replyError(client, 3n), errno.EINVAL);
  client.sendRequest({ command: NBD_CMD.WRITE_ZEROES, cookie: 4n, offset: sizeBytes - 1n, length: 2 });
  assert.equal(await replyError(client, 4n), errno.ENOSPC);
  client.destroy();
});

test("structured READ: one OFFSET_DATA chunk with DONE, errors as ERROR chunks, holes as OFFSET_HOLE", async () => {
  const { client } = await open("holey", { structured: true });
  client.sendRequest({ command: NBD_CMD.READ, cookie: 1n, offset: 4096n, length: 4096 });
  const data = await client.readStructuredChunk();
  assert.deepEqual([data.type, data.flags, data.cookie], [NBD_REPLY_TYPE.OFFSET_DATA, 1, 1n]);
  assert.equal(data.payload.readBigUInt64BE(0), 4096n);
  assert.ok(data.payload.subarray(8).equals(Buffer.alloc(4096, 0x11)));

  client.sendRequest({ command: NBD_CMD.READ, cookie: 2n, offset: BigInt(mib), length: mib });
  const hole = await client.readStructuredChunk();
  assert.deepEqual([hole.type, hole.flags], [NBD_REPLY_TYPE.OFFSET_HOLE, 1]);
  assert.deepEqual([hole.payload.readBigUInt64BE(0), hole.payload.readUInt32BE(8)], [BigInt(mib), mib]);

  // [0, 320K): data 64K, hole 128K, data 64K, hole 64K. Chunks must cover the range exactly once.
  const lengthBytes = 320 * 1024;
  client.sendRequest({ command: NBD_CMD.READ, cookie: 3n, offset: 0n, length: lengthBytes });
  const image = Buffer.alloc(lengthBytes, 0xee);
  const covered = new Uint8Array(lengthBytes);
  let holeChunks = 0;
  for (;;) {
    const chunk = await client.readStructuredChunk();
    assert.equal(chunk.cookie, 3n);
    const start = Number(chunk.payload.readBigUInt64BE(0));
    let length: number;
    if (chunk.type === NBD_REPLY_TYPE.OFFSET_HOLE) {
      holeChunks += 1;
      length = chunk.payload.readUInt32BE(8);
      image.fill(0, start, start + length);
    } else {
      assert.equal(chunk.type, NBD_REPLY_TYPE.OFFSET_DATA);
      length = chunk.payload.byteLength - 8;
      chunk.payload.copy(image, start, 8);
    }
    for (let index = start; index < start + length; index += 1) covered[index]! += 1;
    if (chunk.flags & 1) break;
  }
  assert.ok(
    covered.every((count) => count === 1),
    "every byte covered exactly once",
  );
  assert.ok(holeChunks >= 1);
  const expected = Buffer.alloc(lengthBytes);
  expected.fill(0x11, 0, 64 * 1024);
  expected.fill(0x22, 192 * 1024, 256 * 1024);
  assert.ok(image.equals(expected));

  // DF: a single OFFSET_DATA chunk with explicit zeroes.
  client.sendRequest({ command: NBD_CMD.READ, flags: NBD_CMD_FLAG.DF, cookie: 4n, length: lengthBytes });
  const whole = await client.readStructuredChunk();
  assert.deepEqual([whole.type, whole.flags], [NBD_REPLY_TYPE.OFFSET_DATA, 1]);
  assert.ok(whole.payload.subarray(8).equals(expected));

  client.sendRequest({ command: NBD_CMD.READ, cookie: 5n, offset: 4n * BigInt(mib), length: 1 });
  const error = await client.readStructuredChunk();
  assert.deepEqual(
    [error.type, error.flags, error.payload.readUInt32BE(0)],
    [NBD_REPLY_TYPE.ERROR, 1, errno.EINVAL],
  );
  client.destroy();
});

test("BLOCK_STATUS reports base:allocation, honours REQ_ONE, and is EINVAL past the end", async () => {
  const { client, sizeBytes } = await open("holey", { structured: true, metaContext: true });
  const status = async (cookie: bigint, offset: bigint, length: number, flags = 0) => {
    client.sendRequest({ command: NBD_CMD.BLOCK_STATUS, flags, cookie, offset, length });
    const chunk = await client.readStructuredChunk();
    assert.equal(chunk.cookie, cookie);
    if (chunk.type === NBD_REPLY_TYPE.ERROR) return chunk.payload.readUInt32BE(0);
    assert.deepEqual([chunk.type, chunk.flags], [NBD_REPLY_TYPE.BLOCK_STATUS, 1]);
    assert.equal(chunk.payload.readUInt32BE(0), 1, "context id from SET_META_CONTEXT");
    const extents: Array<[number, number]> = [];
    for (let at = 4; at < chunk.payload.byteLength; at += 8) {
      extents.push([chunk.payload.readUInt32BE(at), chunk.payload.readUInt32BE(at + 4)]);
    }
    return extents;
  };
  const k = 1024;
  assert.deepEqual(await status(1n, 0n, Number(sizeBytes)), [
    [64 * k, 0],
    [128 * k, 3],
    [64 * k, 0],
    [4 * mib - 256 * k, 3],
  ]);
  assert.deepEqual(await status(2n, 32n * 1024n, 256 * k, NBD_CMD_FLAG.REQ_ONE), [[32 * k, 0]]);
  assert.equal(await status(3n, sizeBytes - 512n, 1024), errno.EINVAL);
  assert.equal(await status(4n, 2n ** 63n, 512), errno.EINVAL);
  assert.equal(await status(5n, 0n, 0), errno.EINVAL);
  client.destroy();
});

test("READ and BLOCK_STATUS on an export whose size is not a multiple of 512", async () => {
  const { client, sizeBytes } = await open("odd", { structured: true, metaContext: true });
  assert.equal(sizeBytes, BigInt(oddSizeBytes));
  client.sendRequest({ command: NBD_CMD.READ, cookie: 1n, offset: sizeBytes - 200n, length: 200 });
  const chunk = await client.readStructuredChunk();
  const expected = Buffer.concat([Buffer.alloc(100), Buffer.alloc(100, 0x33)]);
  assert.ok(chunk.payload.subarray(8).equals(expected));
  client.sendRequest({ command: NBD_CMD.BLOCK_STATUS, cookie: 2n, length: oddSizeBytes });
  const status = await client.readStructuredChunk();
  assert.equal(status.type, NBD_REPLY_TYPE.BLOCK_STATUS);
  let totalBytes = 0;
  for (let at = 4; at < status.payload.byteLength; at += 8) totalBytes += status.payload.readUInt32BE(at);
  assert.equal(totalBytes, oddSizeBytes);
  client.destroy();
});

test("repeated cookies are echoed unchanged, including all 64 bits", async () => {
  const { client } = await open("disk");
  const cookie = 0xfedcba9876543210n;
  client.sendRequest({ command: NBD_CMD.FLUSH, cookie });
  client.sendRequest({ command: NBD_CMD.FLUSH, cookie });
  client.sendRequest({ command: NBD_CMD.READ, cookie, length: 16 });
  assert.equal(await replyError(client, cookie), 0);
  assert.equal(await replyError(client, cookie), 0);
  assert.equal(await replyError(client, cookie), 0);
  await client.read(16);
  client.destroy();
});

test("requests are served while earlier ones are in flight, out of order; DISC drains in-flight requests first", async () => {
  const gated = new GatedDevice(new MemoryBackend(mib));
  fixture.source.add(deviceExport("gated", gated));
  const { client } = await open("gated");
  client.sendRequest({ command: NBD_CMD.READ, cookie: 1n, length: 4096 });
  await waitFor(() => gated.waitingReads === 1);
  // A FLUSH sent after the blocked READ is answered first.
  client.sendRequest({ command: NBD_CMD.FLUSH, cookie: 2n });
  assert.equal(await replyError(client, 2n), 0);
  client.sendRequest({ command: NBD_CMD.DISC, cookie: 3n });
  const stats = () => fixture.server.connectionStats().find((entry) => entry.exportName === "gated");
  await waitFor(() => stats()?.state === "FINISHING");
  assert.equal(stats()?.inflightRequests, 1);
  gated.open();
  assert.equal(await replyError(client, 1n), 0);
  assert.equal((await client.read(4096)).byteLength, 4096);
  assert.equal(await client.waitForServerClose(), true);
  fixture.source.remove("gated");
});

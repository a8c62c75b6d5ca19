/**
 * The server under misbehaving clients and failing devices: EOF inside a WRITE payload, 50 connections at
 * once, a client that never reads its replies (bounded memory through back-pressure, proven by the server's
 * counters), failing devices (EIO per request, bugs answered EIO), connectionsMax, shutdown with requests
 * in flight (ESHUTDOWN for late requests, bounded by the close timeout), TCP and socket activation.
 */
import assert from "node:assert/strict";
import * as net from "node:net";
import { test } from "node:test";
import { MemoryBackend } from "../../src/backends/memory-backend.js";
import { StaticExportSource } from "../../src/block/export-source.js";
import { inflightBytesMax, replyQueueBytesMax } from "../../src/nbd/nbd-limits.js";
import { NbdServer } from "../../src/nbd/nbd-server.js";
import type { Logger } from "../../src/util/logger.js";
import { missingTools, run } from "../helpers/commands.js";
import { deviceExport, memoryExport, startTestServer, waitFor } from "./nbd-test-helpers.js";
import { errno, NBD_CMD, RawNbdClient, requestBytes } from "./raw-nbd-client.js";
import { BuggyDevice, FailingDevice, GatedDevice } from "./test-devices.js";

const mib = 1024 * 1024;

function capturingLogger() {
  const lines: Array<{ level: string; message: string }> = [];
  const at =
    (level: string) =>
    (fieldsOrMessage: object | string, message?: string): void => {
      lines.push({ level, message: typeof fieldsOrMessage === "string" ? fieldsOrMessage : (message ?? "") });
    };
  const logger: Logger = { debug: () => {}, info: at("info"), warn: at("warn"), error: at("error") };
  return { logger, lines };
}

async function replyError(client: RawNbdClient, cookie: bigint): Promise<number> {
  const reply = await client.readReply();
  assert.equal(reply.cookie, cookie);
  if (reply.kind === "simple") return reply.error;
  return reply.type === 32769 ? reply.payload.readUInt32BE(0) : 0;
}

test("a client closing inside a WRITE payload is dropped cleanly; the server keeps serving", async () => {
  const fixture = await startTestServer([memoryExport("disk", 4 * mib)]);
  try {
    const client = await RawNbdClient.connect(fixture.socketPath);
    await client.handshake("disk");
    const full = requestBytes({
      command: NBD_CMD.WRITE,
      cookie: 1n,
      offset: 0n,
      payload: Buffer.alloc(65536, 0x77),
    });
    client.socket.end(full.subarray(0, 28 + 1000));
    assert.equal(await client.waitForServerClose(), true);
    await waitFor(() => fixture.server.connectionCount === 0);
    const next = await RawNbdClient.connect(fixture.socketPath);
    await next.handshake("disk");
    next.sendRequest({ command: NBD_CMD.READ, cookie: 2n, length: 1000 });
    assert.equal(await replyError(next, 2n), 0);
    assert.ok(
      (await next.read(1000)).every((byte) => byte === 0),
      "the partial write was not applied",
    );
    next.destroy();
  } finally {
    await fixture.close();
  }
});

test("50 connections at once each write and read back their own block", async () => {
  const fixture = await startTestServer([memoryExport("disk", 4 * mib)]);
  try {
    const count = 50;
    const clients = await Promise.all(
      Array.from({ length: count }, async () => {
        const client = await RawNbdClient.connect(fixture.socketPath);
        await client.handshake("disk", { structured: true });
        return client;
      }),
    );
    assert.equal(fixture.server.connectionCount, count);
    await Promise.all(
      clients.map(async (client, index) => {
        const offset = BigInt(index * 8192);
        const payload = Buffer.alloc(8192, index + 1);
        client.sendRequest({ command: NBD_CMD.WRITE, cookie: 1n, offset, payload });
        assert.equal(await replyError(client, 1n), 0);
      }),
    );
    await Promise.all(
      clients.map(async (client, index) => {
        client.sendRequest({ command: NBD_CMD.READ, cookie: 2n, offset: BigInt(index * 8192), length: 8192 });
        const chunk = await client.readStructuredChunk();
        assert.ok(chunk.payload.subarray(8).equals(Buffer.alloc(8192, index + 1)));
        client.sendRequest({ command: NBD_CMD.DISC });
        await client.waitForServerClose();
      }),
    );
    await waitFor(() => fixture.server.connectionCount === 0);
  } finally {
    await fixture.close();
  }
});

test("a client that never reads its replies stops the server reading: memory stays bounded", async () => {
  const fixture = await startTestServer([memoryExport("disk", 64 * mib)], { inflightRequestsMax: 16 });
  try {
    const client = await RawNbdClient.connect(fixture.socketPath);
    await client.handshake("disk");
    client.socket.pause();
    const requestCount = 2000;
    const readBytes = 256 * 1024;
    const requests = Buffer.concat(
      Array.from({ length: requestCount }, (_, index) =>
        requestBytes({
          command: NBD_CMD.READ,
          cookie: BigInt(index),
          offset: BigInt((index % 256) * readBytes),
          length: readBytes,
        }),
      ),
    );
    client.socket.write(requests);
    const stats = () => fixture.server.connectionStats()[0]!;
    // The server must reach a state where it waits for the client and parses nothing more; without
    // back-pressure it would instead parse every request (and queue every reply).
    const isPaused = () =>
      stats().isWaitingForDrain && stats().isReadingPaused && stats().inflightRequests === 0;
    await waitFor(() => isPaused() || stats().requestsReceived === requestCount);
    const paused = stats();
    assert.ok(paused.requestsReceived < requestCount, `parsed ${paused.requestsReceived} of ${requestCount}`);
    assert.ok(
      paused.queuedReplyBytes <= replyQueueBytesMax + inflightBytesMax,
      `queued ${paused.queuedReplyBytes} reply bytes`,
    );
    assert.ok(paused.unparsedBytes <= 28 * requestCount);
    // Once the client reads again, every request is answered.
    client.socket.resume();
    const seen = new Set<bigint>();
    for (let index = 0; index < requestCount; index += 1) {
      const reply = await client.readSimpleReply();
      assert.equal(reply.error, 0);
      seen.add(reply.cookie);
      await client.read(readBytes);
    }
    assert.equal(seen.size, requestCount);
    client.destroy();
  } finally {
    await fixture.close();
  }
});

test("READs still being read count against the reply queue: a burst of 64 starts only a queue's worth at once", async () => {
  const readBytes = 256 * 1024;
  const requestCount = 64;
  const backend = new MemoryBackend(requestCount * readBytes);
  const content = Buffer.alloc(requestCount * readBytes);
  for (let index = 0; index < content.byteLength; index += 4096) content.writeUInt32LE(index, index);
  await backend.write(0, content);
  const gated = new GatedDevice(backend);
  const fixture = await startTestServer([deviceExport("gated", gated)]);
  try {
    const client = await RawNbdClient.connect(fixture.socketPath);
    await client.handshake("gated");
    const requests = Array.from({ length: requestCount }, (_, index) =>
      requestBytes({
        command: NBD_CMD.READ,
        cookie: BigInt(index),
        offset: BigInt(index * readBytes),
        length: readBytes,
      }),
    );
    client.socket.write(Buffer.concat(requests));
    const stats = () => fixture.server.connectionStats()[0]!;
    const startedMax = Math.ceil(replyQueueBytesMax / readBytes);
    // Bounded wait: until a queue's worth of READs started (or more: the bug this test is for).
    for (let pollIndex = 0; pollIndex < 2000 && gated.waitingReads < startedMax; pollIndex += 1) {
      await new Promise((resolve) => setTimeout(resolve, 5));
    }
    // Give the server every chance to start more than it should before looking.
    await new Promise((resolve) => setTimeout(resolve, 50));
    assert.ok(
      stats().unparsedBytes > 0,
      `the rest of the burst waits unparsed: ${JSON.stringify(stats())} waiting ${gated.waitingReads}`,
    );
    assert.equal(gated.waitingReads, startedMax, "READs started while their replies could not be queued");
    assert.equal(stats().inflightRequests, startedMax);
    gated.open();
    const seen = new Set<bigint>();
    for (let index = 0; index < requestCount; index += 1) {
      const reply = await client.readSimpleReply();
      assert.equal(reply.error, 0);
      const data = await client.read(readBytes);
      const offsetBytes = Number(reply.cookie) * readBytes;
      assert.ok(
        data.equals(content.subarray(offsetBytes, offsetBytes + readBytes)),
        `data of READ ${reply.cookie}`,
      );
      seen.add(reply.cookie);
    }
    assert.equal(seen.size, requestCount);
    client.destroy();
  } finally {
    await fixture.close();
  }
});

test("an export whose device fails with EIO answers EIO per request and keeps the connection", async () => {
  const fixture = await startTestServer([deviceExport("broken", new FailingDevice(new MemoryBackend(mib)))]);
  try {
    for (const structured of [false, true]) {
      const client = await RawNbdClient.connect(fixture.socketPath);
      await client.handshake("broken", { structured, metaContext: structured });
      client.sendRequest({ command: NBD_CMD.READ, cookie: 1n, length: 4096 });
      assert.equal(await replyError(client, 1n), errno.EIO);
      client.sendRequest({ command: NBD_CMD.WRITE, cookie: 2n, payload: Buffer.alloc(4096) });
      assert.equal(await replyError(client, 2n), errno.EIO);
      client.sendRequest({ command: NBD_CMD.FLUSH, cookie: 3n });
      assert.equal(await replyError(client, 3n), errno.EIO);
      if (structured) {
        client.sendRequest({ command: NBD_CMD.BLOCK_STATUS, cookie: 4n, length: 4096 });
        assert.equal(await replyError(client, 4n), errno.EIO);
      }
      client.sendRequest({ command: NBD_CMD.READ, cookie: 5n, length: 512 });
      assert.equal(await replyError(client, 5n), errno.EIO);
      client.destroy();
    }
  } finally {
    await fixture.close();
  }
});

test("a device that throws something other than a BlockError gets EIO and a log line, not a crash", async () => {
  const { logger, lines } = capturingLogger();
  const fixture = await startTestServer([deviceExport("buggy", new BuggyDevice(new MemoryBackend(mib)))], {
    logger,
  });
  try {
    const client = await RawNbdClient.connect(fixture.socketPath);
    await client.handshake("buggy");
    client.sendRequest({ command: NBD_CMD.READ, cookie: 1n, length: 512 });
    assert.equal(await replyError(client, 1n), errno.EIO);
    client.sendRequest({ command: NBD_CMD.WRITE, cookie: 2n, payload: Buffer.alloc(512) });
    assert.equal(await replyError(client, 2n), errno.EIO);
    client.sendRequest({ command: NBD_CMD.WRITE_ZEROES, cookie: 3n, length: 512 });
    assert.equal(await replyError(client, 3n), errno.EIO);
    client.sendRequest({ command: NBD_CMD.FLUSH, cookie: 4n });
    assert.equal(await replyError(client, 4n), 0);
    assert.equal(lines.filter((line) => line.level === "error").length, 3);
    client.destroy();
  } finally {
    await fixture.close();
  }
});

test("connections beyond connectionsMax are closed at accept with a log line", async () => {
  const { logger, lines } = capturingLogger();
  const fixture = await startTestServer([memoryExport("disk", mib)], { connectionsMax: 2, logger });
  try {
    const first = await RawNbdClient.connect(fixture.socketPath);
    const second = await RawNbdClient.connect(fixture.socketPath);
    await first.readGreeting();
    await second.readGreeting();
    const third = await RawNbdClient.connect(fixture.socketPath);
    await assert.rejects(third.readGreeting(), /closed with 0\/18 bytes/);
    assert.equal(fixture.server.connectionCount, 2);
    assert.ok(lines.some((line) => line.level === "warn" && /too many connections/.test(line.message)));
    first.destroy();
    await waitFor(() => fixture.server.connectionCount === 1);
    const fourth = await RawNbdClient.connect(fixture.socketPath);
    await fourth.readGreeting();
    second.destroy();
    fourth.destroy();
  } finally {
    await fixture.close();
  }
});

test("close() lets in-flight requests finish, answers later requests ESHUTDOWN, then closes", async () => {
  const gated = new GatedDevice(new MemoryBackend(mib));
  const fixture = await startTestServer([deviceExport("gated", gated)]);
  const client = await RawNbdClient.connect(fixture.socketPath);
  await client.handshake("gated");
  const idle = await RawNbdClient.connect(fixture.socketPath);
  await idle.handshake("gated");
  client.sendRequest({ command: NBD_CMD.READ, cookie: 1n, length: 4096 });
  await waitFor(() => gated.waitingReads === 1);
  const closing = fixture.close();
  // A connection with nothing in flight is closed at once.
  assert.equal(await idle.waitForServerClose(), true);
  client.sendRequest({ command: NBD_CMD.READ, cookie: 2n, length: 4096 });
  assert.equal(await replyError(client, 2n), errno.ESHUTDOWN);
  client.sendRequest({ command: NBD_CMD.WRITE, cookie: 3n, payload: Buffer.alloc(4096, 1) });
  assert.equal(await replyError(client, 3n), errno.ESHUTDOWN);
  gated.open();
  assert.equal(await replyError(client, 1n), 0);
  assert.equal((await client.read(4096)).byteLength, 4096);
  assert.equal(await client.waitForServerClose(), true);
  await closing;
  assert.equal(fixture.server.connectionCount, 0);
  await assert.rejects(RawNbdClient.connect(fixture.socketPath));
});

test("close() is bounded: a request that never finishes is cut off at the close timeout", async () => {
  const gated = new GatedDevice(new MemoryBackend(mib));
  const fixture = await startTestServer([deviceExport("stuck", gated)], { closeTimeoutMs: 50 });
  const client = await RawNbdClient.connect(fixture.socketPath);
  await client.handshake("stuck");
  client.sendRequest({ command: NBD_CMD.READ, cookie: 1n, length: 4096 });
  await waitFor(() => gated.waitingReads === 1);
  await fixture.close();
  assert.equal(fixture.server.connectionCount, 0);
  assert.equal(await client.waitForServerClose(), true);
  gated.open();
});

test("listenTcp on an ephemeral port serves nbdinfo over nbd://127.0.0.1", async (t) => {
  const server = new NbdServer(new StaticExportSource([memoryExport("disk", 3 * mib)]));
  const address = await server.listenTcp("127.0.0.1", 0);
  try {
    assert.ok(address.port > 0);
    const raw = await new Promise<net.Socket>((resolve, reject) => {
      const socket = net.connect(address.port, address.host, () => resolve(socket));
      socket.on("error", reject);
    });
    raw.destroy();
    const skip = missingTools("nbdinfo");
    if (skip) {
      t.skip(skip);
      return;
    }
    const result = await run("nbdinfo", ["--size", `nbd://127.0.0.1:${address.port}/disk`]);
    assert.equal(result.code, 0, result.stderr);
    assert.equal(result.stdout.trim(), String(3 * mib));
  } finally {
    await server.close();
  }
});

test("listenFd serves a socket passed by systemd-style activation (nbdinfo -- [ server ])", async (t) => {
  const skip = missingTools("nbdinfo");
  if (skip) {
    t.skip(skip);
    return;
  }
  const compiled = new URL("./socket-activation-server.js", import.meta.url).pathname;
  const result = await run("nbdinfo", ["--json", "--", "[", process.execPath, compiled, "]"]);
  assert.equal(result.code, 0, result.stderr);
  const info = JSON.parse(result.stdout) as {
    exports: Array<{ "export-size": number; description: string }>;
  };
  assert.equal(info.exports[0]?.["export-size"], mib);
  assert.equal(info.exports[0]?.description, "activated");
});

/**
 * Hostile TLS against an in-process NbdServer with `--tls require` and a PSK key (issue 9): raw sockets
 * that do STARTTLS by hand and then send what a broken or malicious client would — a cut ClientHello, a
 * garbage record that looks like a handshake, a whole recorded handshake replayed on a new connection,
 * STARTTLS twice (in plain text back to back, and again inside TLS), and hundreds of connections left
 * half-way through their TLS handshake. Each ends its own connection only: the server (this process)
 * stays up, keeps its bounded connection count, and serves libnbd and Node clients throughout.
 */
import assert from "node:assert/strict";
import { once } from "node:events";
import { mkdtemp, rm, writeFile } from "node:fs/promises";
import * as net from "node:net";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { Duplex } from "node:stream";
import { after, before, test } from "node:test";
import * as tls from "node:tls";
import { loadNbdTls } from "../../src/nbd/tls.js";
import { run, which } from "../helpers/commands.js";
import { memoryExport, startTestServer, type TestServer, waitFor } from "./nbd-test-helpers.js";
import { IHAVEOPT, NBD_OPT, NBD_REP } from "./raw-nbd-client.js";

const pskKey = Buffer.from("8e4f0c2b9a7d6e5f4031a2b3c4d5e6f708192a3b4c5d6e7f8091a2b3c4d5e6f7", "hex");
const pskIdentity = "alice";

let fixture: TestServer;
let keyDirectory = "";
let pskFile = "";

before(async () => {
  keyDirectory = await mkdtemp(join(tmpdir(), "blocksnap-tls-probes-"));
  pskFile = join(keyDirectory, "keys.psk");
  await writeFile(pskFile, `${pskIdentity}:${pskKey.toString("hex")}\n`, { mode: 0o600 });
  const nbdTls = await loadNbdTls({ mode: "require", pskFile });
  // Every probe comes from this process's uid: the per-client limit must leave room for the 200 below.
  fixture = await startTestServer([memoryExport("disk", 1024 * 1024)], {
    tls: nbdTls,
    connectionsPerClientMax: 256,
  });
});
after(async () => {
  await fixture.close();
  await rm(keyDirectory, { recursive: true, force: true });
});

function optionBytes(option: number, payload: Buffer = Buffer.alloc(0)): Buffer {
  const header = Buffer.alloc(16);
  header.writeBigUInt64BE(IHAVEOPT, 0);
  header.writeUInt32BE(option, 8);
  header.writeUInt32BE(payload.byteLength, 12);
  return Buffer.concat([header, payload]);
}

/** A plain connection that has read the greeting and sent the client flags; `received` collects replies. */
async function plainConnection(): Promise<{ socket: net.Socket; received: () => Buffer }> {
  const socket = net.connect(fixture.socketPath);
  socket.on("error", () => {});
  let received = Buffer.alloc(0);
  const onData = (chunk: Buffer) => {
    received = Buffer.concat([received, chunk]);
  };
  socket.on("data", onData);
  await once(socket, "connect");
  await waitFor(() => received.byteLength >= 18 || socket.destroyed);
  const flags = Buffer.alloc(4);
  flags.writeUInt32BE(3, 0);
  socket.write(flags);
  return { socket, received: () => received };
}

/** Greeting, flags, STARTTLS and its ACK: the socket is ready for a ClientHello, paused and unread. */
async function afterStartTls(): Promise<net.Socket> {
  const { socket, received } = await plainConnection();
  socket.write(optionBytes(NBD_OPT.STARTTLS));
  await waitFor(() => received().byteLength >= 18 + 20 || socket.destroyed);
  assert.equal(received().readUInt32BE(18 + 12), NBD_REP.ACK, "STARTTLS acknowledged");
  socket.removeAllListeners("data");
  socket.pause();
  return socket;
}

/** Resolves once the server has closed this socket (EOF or reset). */
async function serverClosed(socket: net.Socket): Promise<void> {
  socket.resume();
  if (socket.destroyed || socket.readableEnded) return;
  await Promise.race([once(socket, "end"), once(socket, "close")]);
}

const clientTlsOptions: tls.ConnectionOptions = {
  pskCallback: () => ({ identity: pskIdentity, psk: pskKey }),
  ciphers: "PSK-AES128-GCM-SHA256",
  maxVersion: "TLSv1.2",
  checkServerIdentity: () => undefined,
};

/**
 * Node's PSK client over a relay that records every byte it sends: STARTTLS, the TLS handshake, then
 * NBD_OPT_LIST inside TLS. Returns the names listed, the recorded client bytes, and the open TLS socket.
 */
async function recordedSession(): Promise<{
  names: string[];
  sent: Buffer;
  secure: tls.TLSSocket;
  close: () => void;
}> {
  const plain = await afterStartTls();
  const sent: Buffer[] = [];
  const relay = new Duplex({
    write(chunk: Buffer, _encoding, callback) {
      sent.push(Buffer.from(chunk));
      plain.write(chunk, callback);
    },
    read() {},
  });
  plain.on("data", (chunk: Buffer) => relay.push(chunk));
  plain.on("end", () => relay.push(null));
  plain.resume();
  const secure = tls.connect({ socket: relay, ...clientTlsOptions });
  secure.on("error", () => {});
  await once(secure, "secureConnect");
  const names = await listInside(secure);
  const close = () => {
    secure.destroy();
    plain.destroy();
  };
  return { names, sent: Buffer.concat(sent), secure, close };
}

/** Sends an option inside TLS and reads its replies up to the final one. */
async function optionInside(
  secure: tls.TLSSocket,
  option: number,
): Promise<{ type: number; payload: Buffer }[]> {
  let answer = Buffer.alloc(0);
  const replies: { type: number; payload: Buffer }[] = [];
  const done = new Promise<void>((resolve, reject) => {
    const onData = (chunk: Buffer) => {
      answer = Buffer.concat([answer, chunk]);
      while (answer.byteLength >= 20 && answer.byteLength >= 20 + answer.readUInt32BE(16)) {
        const type = answer.readUInt32BE(12);
        const length = answer.readUInt32BE(16);
        replies.push({ type, payload: answer.subarray(20, 20 + length) });
        answer = answer.subarray(20 + length);
        if (type === NBD_REP.ACK || type >= 0x80000000) {
          secure.off("data", onData);
          secure.off("close", onClose);
          resolve();
          return;
        }
      }
    };
    const onClose = () => reject(new Error("the server closed the TLS connection"));
    secure.on("data", onData);
    secure.once("close", onClose);
  });
  secure.write(optionBytes(option));
  await done;
  return replies;
}

async function listInside(secure: tls.TLSSocket): Promise<string[]> {
  const replies = await optionInside(secure, NBD_OPT.LIST);
  return replies
    .filter((reply) => reply.type === NBD_REP.SERVER)
    .map((reply) => reply.payload.subarray(4, 4 + reply.payload.readUInt32BE(0)).toString());
}

/** A ClientHello from Node's PSK client, captured by a listener that answers nothing. */
async function capturedClientHello(): Promise<Buffer> {
  const capture = net.createServer();
  const first = new Promise<Buffer>((resolve) =>
    capture.on("connection", (socket) =>
      socket.once("data", (chunk: Buffer) => {
        resolve(chunk);
        socket.destroy();
      }),
    ),
  );
  await new Promise<void>((resolve) => capture.listen(0, "127.0.0.1", resolve));
  const { port } = capture.address() as net.AddressInfo;
  const client = tls.connect({ host: "127.0.0.1", port, ...clientTlsOptions });
  client.on("error", () => {});
  const hello = await first;
  client.destroy();
  await new Promise<void>((resolve) => capture.close(() => resolve()));
  assert.equal(hello[0], 0x16, "a TLS handshake record");
  return hello;
}

async function stillServing(): Promise<void> {
  const { names, close } = await recordedSession();
  assert.deepEqual(names, ["disk"], "a good TLS client is still served");
  close();
}

test("a cut ClientHello, a garbage handshake record and a replayed handshake each end their connection only", async () => {
  const { names, sent, close } = await recordedSession();
  assert.deepEqual(names, ["disk"]);
  close();
  const hello = await capturedClientHello();

  const cut = await afterStartTls();
  cut.end(hello.subarray(0, Math.floor(hello.byteLength / 2)));
  await serverClosed(cut);

  const garbage = await afterStartTls();
  const record = Buffer.alloc(5 + 300);
  record.writeUInt8(0x16, 0);
  record.writeUInt16BE(0x0301, 1);
  record.writeUInt16BE(300, 3);
  for (let index = 5; index < record.byteLength; index++) record[index] = (index * 73) & 0xff;
  garbage.write(record);
  await serverClosed(garbage);

  const replayed = await afterStartTls();
  replayed.write(sent);
  await serverClosed(replayed);

  await stillServing();
  await waitFor(() => fixture.server.connectionCount === 0);
});

test("STARTTLS twice: back to back in plain text closes; again inside TLS is ERR_INVALID and TLS stays up", async () => {
  const { socket, received } = await plainConnection();
  socket.write(Buffer.concat([optionBytes(NBD_OPT.STARTTLS), optionBytes(NBD_OPT.STARTTLS)]));
  await serverClosed(socket);
  assert.ok(received().byteLength <= 18 + 20, "nothing but the greeting and at most one ACK came back");

  const { secure, close } = await recordedSession();
  const again = await optionInside(secure, NBD_OPT.STARTTLS);
  assert.equal(again.at(-1)?.type, NBD_REP.ERR_INVALID, "STARTTLS inside TLS");
  assert.deepEqual(await listInside(secure), ["disk"], "the TLS session goes on");
  close();
  await waitFor(() => fixture.server.connectionCount === 0);
});

test("hundreds of connections stuck inside the TLS handshake: bounded, and the server keeps serving", async (t) => {
  const hello = await capturedClientHello();
  const count = 200;
  // Opened together (the server identifies each client's uid in batches), so that none of them reaches
  // the handshake timeout before the last one is open.
  const stuck = await Promise.all(
    Array.from({ length: count }, async (_, index) => {
      const socket = await afterStartTls();
      // Half of them sent half a ClientHello, the others nothing at all after STARTTLS.
      if (index % 2 === 0) socket.write(hello.subarray(0, Math.floor(hello.byteLength / 2)));
      return socket;
    }),
  );
  // All of them, unless a machine under load let the handshake timeout end some: never more.
  assert.ok(fixture.server.connectionCount > 0 && fixture.server.connectionCount <= count);
  for (const stats of fixture.server.connectionStats()) {
    assert.equal(stats.state, "UPGRADING");
    assert.equal(stats.unparsedBytes, 0, "nothing is buffered for the NBD parser while TLS is not up");
  }
  await stillServing();
  if (which("nbdinfo")) {
    const info = await run("nbdinfo", [
      `nbds+unix://${pskIdentity}@/disk?socket=${fixture.socketPath}&tls-psk-file=${pskFile}`,
    ]);
    assert.equal(info.code, 0, info.stderr);
    assert.match(info.stdout, /with TLS/);
  } else {
    t.diagnostic("nbdinfo absent: the libnbd check is skipped");
  }
  for (const socket of stuck) socket.destroy();
  await waitFor(() => fixture.server.connectionCount === 0);
  await stillServing();
});

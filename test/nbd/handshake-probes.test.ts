/**
 * Raw-socket probes of the fixed-newstyle handshake (docs/design/nbd-notes.md, "Conformance"): option
 * corners, bad magics, oversized payloads. Each test speaks bytes to an in-process NbdServer.
 */
import assert from "node:assert/strict";
import { after, before, test } from "node:test";
import type { TestServer } from "./nbd-test-helpers.js";
import { memoryExport, startTestServer } from "./nbd-test-helpers.js";
import {
  infoPayload,
  metaContextPayload,
  NBD_CMD,
  NBD_FLAG,
  NBD_OPT,
  NBD_REP,
  RawNbdClient,
  requestBytes,
  SIMPLE_REPLY_MAGIC,
} from "./raw-nbd-client.js";

const diskSizeBytes = 8 * 1024 * 1024;
let fixture: TestServer;

before(async () => {
  fixture = await startTestServer([
    memoryExport("disk", diskSizeBytes),
    memoryExport("ro", 1024 * 1024, true),
    memoryExport("", 4096),
  ]);
});

after(async () => {
  await fixture.close();
});

async function afterFlags(clientFlags = 3): Promise<RawNbdClient> {
  const client = await RawNbdClient.connect(fixture.socketPath);
  await client.readGreeting();
  client.sendClientFlags(clientFlags);
  return client;
}

test("greeting is NBDMAGIC IHAVEOPT 0003; an unknown option gets ERR_UNSUP and haggling continues", async () => {
  const client = await RawNbdClient.connect(fixture.socketPath);
  const greeting = await client.readGreeting();
  assert.equal(greeting.toString("hex"), `${Buffer.from("NBDMAGICIHAVEOPT").toString("hex")}0003`);
  client.sendClientFlags(1);
  client.sendOption(0x7654321, Buffer.from("abcd"));
  const unsupported = await client.readOptionReply();
  assert.equal(unsupported.option, 0x7654321);
  assert.equal(unsupported.type, NBD_REP.ERR_UNSUP);
  client.sendOption(NBD_OPT.LIST);
  const replies = await client.readOptionReplies();
  assert.equal(replies.at(-1)?.type, NBD_REP.ACK);
  assert.equal(replies.filter((reply) => reply.type === NBD_REP.SERVER).length, 3);
  client.sendOption(NBD_OPT.ABORT);
  assert.equal((await client.readOptionReply()).type, NBD_REP.ACK);
  assert.equal(await client.waitForServerClose(), true);
});

test("EXTENDED_HEADERS is answered ERR_UNSUP; STARTTLS without TLS configured ERR_POLICY", async () => {
  const client = await afterFlags();
  client.sendOption(NBD_OPT.EXTENDED_HEADERS);
  const unsupported = await client.readOptionReply();
  assert.equal(unsupported.option, NBD_OPT.EXTENDED_HEADERS);
  assert.equal(unsupported.type, NBD_REP.ERR_UNSUP);
  client.sendOption(NBD_OPT.STARTTLS);
  const policy = await client.readOptionReply();
  assert.equal(policy.option, NBD_OPT.STARTTLS);
  assert.equal(policy.type, 0x80000002);
  client.destroy();
});

test("client flags with an unknown bit (0x80) make the server close", async () => {
  const client = await afterFlags(0x80);
  assert.equal(await client.waitForServerClose(), true);
});

test("a transmission request during option haggling makes the server close", async () => {
  const client = await afterFlags();
  client.write(requestBytes({ command: NBD_CMD.READ, length: 512 }));
  assert.equal(await client.waitForServerClose(), true);
});

test("NBD_OPT_LIST with a payload is ERR_INVALID; LIST names every export with its description", async () => {
  const client = await afterFlags();
  client.sendOption(NBD_OPT.LIST, Buffer.from([0, 0, 0, 0]));
  assert.equal((await client.readOptionReply()).type, NBD_REP.ERR_INVALID);
  client.sendOption(NBD_OPT.LIST);
  const replies = await client.readOptionReplies();
  const servers = replies
    .filter((reply) => reply.type === NBD_REP.SERVER)
    .map((reply) => {
      const nameBytes = reply.payload.readUInt32BE(0);
      return [
        reply.payload.subarray(4, 4 + nameBytes).toString(),
        reply.payload.subarray(4 + nameBytes).toString(),
      ];
    });
  assert.deepEqual(servers.sort(), [
    ["", "memory export "],
    ["disk", "memory export disk"],
    ["ro", "memory export ro"],
  ]);
  client.destroy();
});

test("NBD_OPT_GO whose name length exceeds the payload is ERR_INVALID, and a later GO still works", async () => {
  const client = await afterFlags();
  client.sendOption(NBD_OPT.GO, Buffer.from("000000ff", "hex"));
  assert.equal((await client.readOptionReply()).type, NBD_REP.ERR_INVALID);
  // Info request count that does not match the payload length.
  const payload = infoPayload("disk", [3]);
  client.sendOption(NBD_OPT.GO, payload.subarray(0, payload.byteLength - 1));
  assert.equal((await client.readOptionReply()).type, NBD_REP.ERR_INVALID);
  client.sendOption(NBD_OPT.GO, infoPayload("disk", [3]));
  assert.equal((await client.readOptionReplies()).at(-1)?.type, NBD_REP.ACK);
  client.destroy();
});

test("SET_META_CONTEXT before STRUCTURED_REPLY is ERR_INVALID", async () => {
  const client = await afterFlags();
  client.sendOption(NBD_OPT.SET_META_CONTEXT, metaContextPayload("", ["base:allocation"]));
  assert.equal((await client.readOptionReply()).type, NBD_REP.ERR_INVALID);
  client.destroy();
});

test("a second STRUCTURED_REPLY is ERR_INVALID; STRUCTURED_REPLY with data is ERR_INVALID", async () => {
  const client = await afterFlags();
  client.sendOption(NBD_OPT.STRUCTURED_REPLY, Buffer.from("x"));
  assert.equal((await client.readOptionReply()).type, NBD_REP.ERR_INVALID);
  client.sendOption(NBD_OPT.STRUCTURED_REPLY);
  assert.equal((await client.readOptionReply()).type, NBD_REP.ACK);
  client.sendOption(NBD_OPT.STRUCTURED_REPLY);
  assert.equal((await client.readOptionReply()).type, NBD_REP.ERR_INVALID);
  client.destroy();
});

test("EXPORT_NAME with NO_ZEROES sends exactly 10 bytes, without it 134", async () => {
  for (const [clientFlags, expectedBytes] of [
    [3, 10],
    [1, 134],
  ] as const) {
    const client = await afterFlags(clientFlags);
    client.sendOption(NBD_OPT.EXPORT_NAME, Buffer.alloc(0));
    const reply = await client.read(expectedBytes);
    assert.equal(reply.readBigUInt64BE(0), 4096n);
    assert.equal(reply.readUInt16BE(8) & NBD_FLAG.HAS_FLAGS, NBD_FLAG.HAS_FLAGS);
    assert.ok(reply.subarray(10).every((byte) => byte === 0));
    // The very next bytes are the reply to a request: there was no further padding.
    client.sendRequest({ command: NBD_CMD.READ, cookie: 7n, length: 16 });
    const next = await client.read(4);
    assert.equal(next.readUInt32BE(0), SIMPLE_REPLY_MAGIC);
    client.destroy();
  }
});

test("EXPORT_NAME of an unknown export disconnects", async () => {
  const client = await afterFlags();
  client.sendOption(NBD_OPT.EXPORT_NAME, Buffer.from("no-such-export"));
  assert.equal(await client.waitForServerClose(), true);
});

test("OPT_INFO and OPT_GO of an unknown export are ERR_UNKNOWN; GO after a failed GO works", async () => {
  const client = await afterFlags();
  client.sendOption(NBD_OPT.INFO, infoPayload("no-such-export", []));
  assert.equal((await client.readOptionReply()).type, NBD_REP.ERR_UNKNOWN);
  client.sendOption(NBD_OPT.GO, infoPayload("no-such-export", []));
  assert.equal((await client.readOptionReply()).type, NBD_REP.ERR_UNKNOWN);
  client.sendOption(NBD_OPT.GO, infoPayload("disk", []));
  assert.equal((await client.readOptionReplies()).at(-1)?.type, NBD_REP.ACK);
  client.sendRequest({ command: NBD_CMD.READ, cookie: 9n, length: 512 });
  const reply = await client.readSimpleReply();
  assert.deepEqual([reply.error, reply.cookie], [0, 9n]);
  client.destroy();
});

test("INFO followed by GO with the same parameters gets identical information", async () => {
  const client = await afterFlags();
  const requests = [0, 1, 2, 3];
  client.sendOption(NBD_OPT.INFO, infoPayload("disk", requests));
  const info = await client.readOptionReplies();
  client.sendOption(NBD_OPT.GO, infoPayload("disk", requests));
  const go = await client.readOptionReplies();
  const strip = (replies: typeof info) => replies.map((reply) => [reply.type, reply.payload.toString("hex")]);
  assert.deepEqual(strip(info), strip(go));
  const infoTypes = info
    .filter((reply) => reply.type === NBD_REP.INFO)
    .map((reply) => reply.payload.readUInt16BE(0));
  assert.deepEqual(infoTypes.sort(), [0, 1, 2, 3]);
  const exportInfo = info.find(
    (reply) => reply.type === NBD_REP.INFO && reply.payload.readUInt16BE(0) === 0,
  )!;
  assert.equal(exportInfo.payload.readBigUInt64BE(2), BigInt(diskSizeBytes));
  const blockSize = info.find((reply) => reply.type === NBD_REP.INFO && reply.payload.readUInt16BE(0) === 3)!;
  assert.deepEqual(
    [
      blockSize.payload.readUInt32BE(2),
      blockSize.payload.readUInt32BE(6),
      blockSize.payload.readUInt32BE(10),
    ],
    [1, 4096, 32 * 1024 * 1024],
  );
  client.destroy();
});

test("export names longer than 4096 bytes or containing NUL are ERR_INVALID", async () => {
  const client = await afterFlags();
  client.sendOption(NBD_OPT.GO, infoPayload("x".repeat(4097), []));
  assert.equal((await client.readOptionReply()).type, NBD_REP.ERR_INVALID);
  client.sendOption(NBD_OPT.INFO, infoPayload(Buffer.from("di\0sk"), []));
  assert.equal((await client.readOptionReply()).type, NBD_REP.ERR_INVALID);
  client.sendOption(NBD_OPT.GO, infoPayload(Buffer.from([0xff, 0xfe]), []));
  assert.equal((await client.readOptionReply()).type, NBD_REP.ERR_INVALID);
  client.destroy();
});

test("LIST_META_CONTEXT lists base:allocation for no query, base: and base:allocation, and nothing else", async () => {
  const client = await afterFlags();
  client.sendOption(NBD_OPT.STRUCTURED_REPLY);
  await client.readOptionReply();
  const list = async (queries: string[]) => {
    client.sendOption(NBD_OPT.LIST_META_CONTEXT, metaContextPayload("disk", queries));
    const replies = await client.readOptionReplies();
    assert.equal(replies.at(-1)?.type, NBD_REP.ACK);
    return replies
      .filter((reply) => reply.type === NBD_REP.META_CONTEXT)
      .map((reply) => reply.payload.subarray(4).toString());
  };
  assert.deepEqual(await list([]), ["base:allocation"]);
  assert.deepEqual(await list(["base:"]), ["base:allocation"]);
  assert.deepEqual(await list(["qemu:dirty-bitmap:x", "base:allocation"]), ["base:allocation"]);
  assert.deepEqual(await list(["x-unknown:thing"]), []);
  client.sendOption(NBD_OPT.LIST_META_CONTEXT, metaContextPayload("no-such-export", []));
  assert.equal((await client.readOptionReply()).type, NBD_REP.ERR_UNKNOWN);
  // Malformed: query count larger than the payload holds.
  const malformed = metaContextPayload("disk", []);
  malformed.writeUInt32BE(1000, malformed.byteLength - 4);
  client.sendOption(NBD_OPT.SET_META_CONTEXT, malformed);
  assert.equal((await client.readOptionReply()).type, NBD_REP.ERR_INVALID);
  client.destroy();
});

async function blockStatusErrorAfter(options: {
  setFor?: string;
  second?: string[];
  structured?: boolean;
  goTo: string;
}) {
  const client = await afterFlags();
  if (options.structured !== false) {
    client.sendOption(NBD_OPT.STRUCTURED_REPLY);
    await client.readOptionReply();
  }
  if (options.setFor !== undefined) {
    client.sendOption(NBD_OPT.SET_META_CONTEXT, metaContextPayload(options.setFor, ["base:allocation"]));
    const replies = await client.readOptionReplies();
    assert.equal(replies.length, 2, "one META_CONTEXT reply, then ACK");
    assert.equal(replies[0]?.payload.subarray(4).toString(), "base:allocation");
  }
  if (options.second !== undefined) {
    client.sendOption(NBD_OPT.SET_META_CONTEXT, metaContextPayload(options.goTo, options.second));
    assert.equal((await client.readOptionReplies()).at(-1)?.type, NBD_REP.ACK);
  }
  client.sendOption(NBD_OPT.GO, infoPayload(options.goTo, []));
  assert.equal((await client.readOptionReplies()).at(-1)?.type, NBD_REP.ACK);
  client.sendRequest({ command: NBD_CMD.BLOCK_STATUS, cookie: 5n, length: 4096 });
  const reply = await client.readReply();
  client.destroy();
  if (reply.kind === "simple") return reply.error;
  return reply.type === 32769 ? reply.payload.readUInt32BE(0) : 0;
}

test("BLOCK_STATUS works only for the export named in SET_META_CONTEXT, and a second SET replaces the first", async () => {
  assert.equal(await blockStatusErrorAfter({ setFor: "disk", goTo: "disk" }), 0);
  assert.equal(await blockStatusErrorAfter({ setFor: "ro", goTo: "disk" }), 22);
  assert.equal(await blockStatusErrorAfter({ goTo: "disk" }), 22);
  assert.equal(await blockStatusErrorAfter({ setFor: "disk", second: [], goTo: "disk" }), 22);
  assert.equal(await blockStatusErrorAfter({ setFor: "disk", second: ["base:"], goTo: "disk" }), 22);
  assert.equal(await blockStatusErrorAfter({ structured: false, goTo: "disk" }), 22);
});

test("more than 32 options in one handshake disconnect", async () => {
  const client = await afterFlags();
  for (let index = 0; index < 32; index += 1) {
    client.sendOption(NBD_OPT.LIST);
    assert.equal((await client.readOptionReplies()).at(-1)?.type, NBD_REP.ACK);
  }
  client.sendOption(NBD_OPT.LIST);
  assert.equal(await client.waitForServerClose(), true);
});

test("an oversize option payload is skipped and answered ERR_TOO_BIG; an absurd one disconnects", async () => {
  const client = await afterFlags();
  client.sendOption(0x7654321, Buffer.alloc(200 * 1024, 1));
  assert.equal((await client.readOptionReply()).type, NBD_REP.ERR_TOO_BIG);
  client.sendOption(NBD_OPT.GO, infoPayload("disk", []));
  assert.equal((await client.readOptionReplies()).at(-1)?.type, NBD_REP.ACK);
  client.destroy();
  const absurd = await afterFlags();
  absurd.sendOption(NBD_OPT.LIST, Buffer.alloc(0), 0xffff_ffff);
  assert.equal(await absurd.waitForServerClose(), true);
});

test("without fixed newstyle only EXPORT_NAME is accepted", async () => {
  const client = await afterFlags(0);
  client.sendOption(NBD_OPT.LIST);
  assert.equal((await client.readOptionReply()).type, NBD_REP.ERR_INVALID);
  client.sendOption(NBD_OPT.EXPORT_NAME, Buffer.from("disk"));
  const reply = await client.read(134);
  assert.equal(reply.readBigUInt64BE(0), BigInt(diskSizeBytes));
  client.destroy();
});

test("transmission flags follow the export: read-only, capabilities, DF only with structured replies", async () => {
  const readWrite = await RawNbdClient.connect(fixture.socketPath);
  const rw = await readWrite.handshake("disk", { structured: true });
  const expected =
    NBD_FLAG.HAS_FLAGS |
    NBD_FLAG.SEND_FLUSH |
    NBD_FLAG.SEND_FUA |
    NBD_FLAG.SEND_TRIM |
    NBD_FLAG.SEND_WRITE_ZEROES |
    NBD_FLAG.SEND_DF |
    NBD_FLAG.CAN_MULTI_CONN |
    NBD_FLAG.SEND_CACHE |
    NBD_FLAG.SEND_FAST_ZERO;
  assert.equal(rw.transmissionFlags, expected);
  readWrite.destroy();
  const readOnly = await RawNbdClient.connect(fixture.socketPath);
  const ro = await readOnly.handshake("ro");
  assert.equal(
    ro.transmissionFlags,
    NBD_FLAG.HAS_FLAGS |
      NBD_FLAG.READ_ONLY |
      NBD_FLAG.SEND_FLUSH |
      NBD_FLAG.CAN_MULTI_CONN |
      NBD_FLAG.SEND_CACHE,
  );
  readOnly.destroy();
});

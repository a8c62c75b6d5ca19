import assert from "node:assert/strict";
import { test } from "node:test";
import { MemoryBackend } from "../backends/memory-backend.js";
import { CheckedDevice } from "../block/checked-device.js";
import { StaticExportSource } from "../block/export-source.js";
import { parseAccessRules } from "./access-rules.js";
import { exportMetaContexts } from "./export-meta-contexts.js";
import { decodeString, Handshake } from "./handshake.js";
import {
  NBD_FLAG_READ_ONLY,
  NBD_FLAG_SEND_DF,
  NBD_FLAG_SEND_FUA,
  NBD_OPT_EXPORT_NAME,
  NBD_OPT_GO,
  NBD_OPT_INFO,
  NBD_OPT_LIST,
  NBD_OPT_LIST_META_CONTEXT,
  NBD_OPT_SET_META_CONTEXT,
  NBD_OPT_STRUCTURED_REPLY,
  NBD_REP_ACK,
  NBD_REP_ERR_INVALID,
  NBD_REP_ERR_UNKNOWN,
  NBD_REP_META_CONTEXT,
  NBD_REP_SERVER,
} from "./nbd-protocol.js";

function handshake(readOnly = false) {
  const device = new CheckedDevice(new MemoryBackend(1 << 20), { readOnly });
  const source = new StaticExportSource([{ name: "disk", description: "d", device, readOnly }]);
  const machine = new Handshake({ source, requestLengthBytesMax: 32 << 20 });
  assert.equal(machine.onClientFlags(3).kind, "continue");
  return machine;
}

function goPayload(name: string): Buffer {
  const nameBytes = Buffer.from(name);
  const payload = Buffer.alloc(4 + nameBytes.byteLength + 2);
  payload.writeUInt32BE(nameBytes.byteLength, 0);
  nameBytes.copy(payload, 4);
  return payload;
}

test("Handshake GO starts the transmission with the flags INFO announced", () => {
  const machine = handshake();
  assert.equal(machine.onOption(NBD_OPT_STRUCTURED_REPLY, Buffer.alloc(0)).kind, "continue");
  const info = machine.onOption(NBD_OPT_INFO, goPayload("disk"));
  const go = machine.onOption(NBD_OPT_GO, goPayload("disk"));
  assert.equal(info.kind, "continue");
  assert.equal(go.kind, "transmission");
  // Identical but for the echoed option number.
  const withoutOption = (replies: readonly Buffer[]) => replies.map((reply) => reply.subarray(12));
  assert.deepEqual(withoutOption(info.replies), withoutOption(go.replies));
  assert.equal(info.replies.length, 3, "INFO_EXPORT, INFO_BLOCK_SIZE, ACK");
  assert.equal(go.replies.at(-1)!.readUInt32BE(12), NBD_REP_ACK);
  if (go.kind !== "transmission") return;
  assert.equal(go.session.structuredReplies, true);
  assert.ok(go.session.transmissionFlags & NBD_FLAG_SEND_DF);
  assert.ok(go.session.transmissionFlags & NBD_FLAG_SEND_FUA);
  assert.equal(go.session.baseAllocationContextId, 0, "no SET_META_CONTEXT was sent");
});

test("Handshake of a read-only export advertises READ_ONLY and no FUA; no DF without structured replies", () => {
  const machine = handshake(true);
  const step = machine.onOption(NBD_OPT_EXPORT_NAME, Buffer.from("disk"));
  assert.equal(step.kind, "transmission");
  if (step.kind !== "transmission") return;
  assert.equal(step.session.isReadOnly, true);
  assert.ok(step.session.transmissionFlags & NBD_FLAG_READ_ONLY);
  assert.equal(step.session.transmissionFlags & (NBD_FLAG_SEND_FUA | NBD_FLAG_SEND_DF), 0);
  assert.equal(step.replies[0]!.byteLength, 10, "NO_ZEROES was negotiated");
});

test("Handshake shutting down answers options ERR_SHUTDOWN and refuses EXPORT_NAME", () => {
  const machine = handshake();
  machine.isShuttingDown = true;
  const step = machine.onOption(NBD_OPT_GO, goPayload("disk"));
  assert.equal(step.kind, "continue");
  assert.equal(step.replies[0]!.readUInt32BE(12), 2 ** 31 + 7);
  assert.equal(machine.onOption(NBD_OPT_EXPORT_NAME, Buffer.from("disk")).kind, "close");
});

test("decodeString accepts UTF-8 up to 4096 bytes without NUL", () => {
  assert.equal(decodeString(Buffer.from("disk@1234")), "disk@1234");
  assert.equal(decodeString(Buffer.from("é".repeat(2048))), "é".repeat(2048));
  assert.equal(decodeString(Buffer.from("x".repeat(4097))), undefined);
  assert.equal(decodeString(Buffer.from("a\0b")), undefined);
  assert.equal(decodeString(Buffer.from([0xc3])), undefined);
});

const generationContext = "qemu:dirty-bitmap:cbt-g1-1";

function contextSource(): StaticExportSource {
  const device = new CheckedDevice(new MemoryBackend(1 << 20));
  const changedBlocks = {
    generationId: "g1",
    changesNumber: 2,
    previousChangesNumber: 1,
    changedRuns: async () => [],
  };
  return new StaticExportSource([
    { name: "image", description: "", device, readOnly: false, changedBlocks },
    { name: "origin", description: "", device, readOnly: false },
  ]);
}

function contextHandshake(source = contextSource()) {
  const machine = new Handshake({ source, requestLengthBytesMax: 32 << 20 });
  assert.equal(machine.onClientFlags(3).kind, "continue");
  return machine;
}

function metaContextPayload(exportName: string, queries: readonly string[]): Buffer {
  const string = (text: string) => {
    const bytes = Buffer.from(text);
    const length = Buffer.alloc(4);
    length.writeUInt32BE(bytes.byteLength, 0);
    return Buffer.concat([length, bytes]);
  };
  const count = Buffer.alloc(4);
  count.writeUInt32BE(queries.length, 0);
  return Buffer.concat([string(exportName), count, ...queries.map(string)]);
}

/** The [id, name] pairs of the META_CONTEXT replies of a step, which must end with ACK. */
function contextsOf(replies: readonly Buffer[]): Array<[number, string]> {
  assert.equal(replies.at(-1)!.readUInt32BE(12), NBD_REP_ACK);
  return replies.slice(0, -1).map((reply) => {
    assert.equal(reply.readUInt32BE(12), NBD_REP_META_CONTEXT);
    return [reply.readUInt32BE(20), reply.subarray(24).toString("utf8")];
  });
}

test("Handshake LIST_META_CONTEXT: all, namespace wildcards, exact names; unknown namespaces ignored", () => {
  const machine = contextHandshake();
  const list = (exportName: string, queries: readonly string[]) =>
    contextsOf(machine.onOption(NBD_OPT_LIST_META_CONTEXT, metaContextPayload(exportName, queries)).replies);
  const all: Array<[number, string]> = [
    [0, "base:allocation"],
    [0, "qemu:dirty-bitmap:cbt"],
    [0, generationContext],
  ];
  const dirty = all.slice(1);
  assert.deepEqual(list("image", []), all);
  assert.deepEqual(list("image", ["qemu:"]), dirty);
  assert.deepEqual(list("image", ["qemu:dirty-bitmap:"]), dirty);
  assert.deepEqual(list("image", ["base:"]), [[0, "base:allocation"]]);
  assert.deepEqual(list("image", ["x-unknown:", "qemu:dirty-bitmap:other"]), []);
  assert.deepEqual(list("image", [generationContext]), [[0, generationContext]]);
  assert.deepEqual(list("image", ["qemu:dirty-bitmap:cbt-g0-1", "qemu:dirty-bitmap:cbt-g1-2"]), []);
  assert.deepEqual(list("image", ["base:", "qemu:", "qemu:dirty-bitmap:cbt"]), all, "no duplicates");
  assert.deepEqual(list("origin", []), [[0, "base:allocation"]]);
  assert.deepEqual(list("origin", ["qemu:"]), []);
});

test("Handshake SET_META_CONTEXT: exact names, unique ids, bound at GO to the same export only", () => {
  const source = contextSource();
  const machine = contextHandshake(source);
  const set = (exportName: string, queries: readonly string[]) =>
    machine.onOption(NBD_OPT_SET_META_CONTEXT, metaContextPayload(exportName, queries)).replies;
  const refused = set("image", ["qemu:dirty-bitmap:cbt"]);
  assert.equal(refused[0]!.readUInt32BE(12), NBD_REP_ERR_INVALID, "structured replies come first");
  assert.equal(machine.onOption(NBD_OPT_STRUCTURED_REPLY, Buffer.alloc(0)).kind, "continue");
  assert.deepEqual(contextsOf(set("image", ["qemu:", "base:"])), [], "wildcards select nothing");
  const selected = contextsOf(set("image", ["qemu:dirty-bitmap:cbt", "base:allocation"]));
  assert.deepEqual(
    selected.map(([, name]) => name),
    ["base:allocation", "qemu:dirty-bitmap:cbt"],
  );
  assert.equal(new Set(selected.map(([id]) => id)).size, 2, "ids are unique");
  assert.ok(selected.every(([id]) => id !== 0));
  const go = machine.onOption(NBD_OPT_GO, goPayload("image"));
  assert.equal(go.kind, "transmission");
  if (go.kind !== "transmission") return;
  assert.equal(go.session.baseAllocationContextId, selected[0]![0]);
  assert.equal(go.session.metaContexts.length, 1);
  assert.equal(go.session.metaContexts[0]!.id, selected[1]![0]);
  assert.equal(go.session.metaContexts[0]!.context, exportMetaContexts(source.findExport("image")!)[0]);
  assert.equal(go.session.metaContexts[0]!.context.name, "qemu:dirty-bitmap:cbt");

  const other = contextHandshake();
  assert.equal(other.onOption(NBD_OPT_STRUCTURED_REPLY, Buffer.alloc(0)).kind, "continue");
  other.onOption(NBD_OPT_SET_META_CONTEXT, metaContextPayload("image", ["qemu:dirty-bitmap:cbt"]));
  const goOrigin = other.onOption(NBD_OPT_GO, goPayload("origin"));
  assert.equal(goOrigin.kind, "transmission");
  if (goOrigin.kind !== "transmission") return;
  assert.equal(goOrigin.session.baseAllocationContextId, 0);
  assert.deepEqual(goOrigin.session.metaContexts, [], "selected for another export: no context");
});

test("Handshake with access rules: a `none` export is answered like an unknown one, `ro` is a read-only session", () => {
  const device = () => new CheckedDevice(new MemoryBackend(1 << 20), { readOnly: false });
  const source = new StaticExportSource([
    { name: "open", description: "", device: device(), readOnly: false },
    { name: "reading", description: "", device: device(), readOnly: false },
    { name: "hidden", description: "", device: device(), readOnly: false },
  ]);
  const access = parseAccessRules("alice open rw\nalice reading ro\n", "rules");
  const machine = new Handshake({ source, requestLengthBytesMax: 32 << 20, tlsMode: "on", access });
  assert.equal(machine.onClientFlags(3).kind, "continue");
  const listed = (): string[] =>
    machine
      .onOption(NBD_OPT_LIST, Buffer.alloc(0))
      .replies.filter((reply) => reply.readUInt32BE(12) === NBD_REP_SERVER)
      .map((reply) => reply.subarray(24, 24 + reply.readUInt32BE(20)).toString());
  assert.deepEqual(listed(), [], "plain text, no `-` rule: nothing listed");
  machine.onTlsStarted("alice");
  assert.deepEqual(listed(), ["open", "reading"]);
  const answer = (option: number, name: string): Buffer => {
    const payload = option === NBD_OPT_LIST_META_CONTEXT ? metaContextPayload(name, []) : goPayload(name);
    const reply = machine.onOption(option, payload).replies[0]!;
    const body = reply.subarray(20).toString().replaceAll(name, "NAME");
    return Buffer.concat([reply.subarray(0, 20), Buffer.from(body)]);
  };
  for (const option of [NBD_OPT_INFO, NBD_OPT_LIST_META_CONTEXT]) {
    assert.deepEqual(answer(option, "hidden"), answer(option, "absent"), `option ${option}`);
    assert.equal(answer(option, "hidden").readUInt32BE(12), NBD_REP_ERR_UNKNOWN);
  }
  const readOnly = machine.onOption(NBD_OPT_GO, goPayload("reading"));
  assert.equal(readOnly.kind, "transmission");
  if (readOnly.kind !== "transmission") return;
  assert.equal(readOnly.session.isReadOnly, true);
  assert.notEqual(readOnly.session.transmissionFlags & NBD_FLAG_READ_ONLY, 0);
});

import assert from "node:assert/strict";
import { constants } from "node:os";
import { test } from "node:test";
import { MemoryBackend } from "../backends/memory-backend.js";
import { CheckedDevice } from "../block/checked-device.js";
import type { Export } from "../block/export-source.js";
import { StaticExportSource } from "../block/export-source.js";
import { silentLogger } from "../util/logger.js";
import * as abi from "./fuse-abi.js";
import { type DirectReadRegistry, FuseSession } from "./fuse-session.js";

const maxWriteBytes = 1024 * 1024;
const slotBytes = FuseSession.slotBytesFor(maxWriteBytes);

interface Reply {
  readonly error: number;
  readonly unique: bigint;
  readonly body: Uint8Array;
  readonly view: DataView;
}

/** A session over a StaticExportSource that records every reply the way the kernel would read it. */
class Harness {
  readonly source = new StaticExportSource();
  readonly replies: Reply[] = [];
  readonly session: FuseSession;
  private unique = 100n;

  /** Direct-read registrations and replies, in the order they happen. */
  readonly events: string[] = [];

  constructor() {
    const events = this.events;
    const directReads: DirectReadRegistry = {
      open: (handle, fd, sizeBytes) => {
        events.push(`open ${handle} fd ${fd} size ${sizeBytes}`);
        return true;
      },
      close: (handle) => {
        events.push(`close ${handle}`);
      },
    };
    this.session = new FuseSession({
      source: this.source,
      directReads,
      send: (reply) => {
        events.push(`reply ${new DataView(reply.buffer, reply.byteOffset).getBigUint64(8, true)}`);
        const copy = reply.slice();
        const view = new DataView(copy.buffer);
        assert.equal(view.getUint32(0, true), copy.byteLength, "reply length field matches the write");
        const body = copy.subarray(abi.FUSE_OUT_HEADER_BYTES);
        this.replies.push({
          error: view.getInt32(4, true),
          unique: view.getBigUint64(8, true),
          body,
          view: new DataView(body.buffer, body.byteOffset, body.byteLength),
        });
      },
      logger: silentLogger,
      maxWriteBytes,
      backgroundRequestsMax: 16,
    });
  }

  addExport(name: string, sizeBytes: number, readOnly = false): Export {
    const entry: Export = {
      name,
      description: `test ${name}`,
      device: new CheckedDevice(new MemoryBackend(sizeBytes), { readOnly }),
      readOnly,
    };
    this.source.add(entry);
    return entry;
  }

  /** Sends one request; returns its reply, or undefined for requests that take none. */
  async call(
    opcode: number,
    nodeId: bigint,
    body: Uint8Array = new Uint8Array(0),
  ): Promise<Reply | undefined> {
    const slot = new Uint8Array(slotBytes);
    const lengthBytes = abi.FUSE_IN_HEADER_BYTES + body.byteLength;
    const view = new DataView(slot.buffer);
    const unique = this.unique;
    this.unique += 1n;
    view.setUint32(0, lengthBytes, true);
    view.setUint32(4, opcode, true);
    view.setBigUint64(8, unique, true);
    view.setBigUint64(16, nodeId, true);
    slot.set(body, abi.FUSE_IN_HEADER_BYTES);
    const before = this.replies.length;
    await this.session.handle(slot, lengthBytes);
    assert.ok(this.replies.length - before <= 1, "at most one reply per request");
    const reply = this.replies[before];
    if (reply) assert.equal(reply.unique, unique, "reply carries the request's unique");
    return reply;
  }

  async ok(opcode: number, nodeId: bigint, body?: Uint8Array): Promise<Reply> {
    const reply = await this.call(opcode, nodeId, body);
    assert.ok(reply, `opcode ${opcode} got no reply`);
    assert.equal(reply.error, 0, `opcode ${opcode} failed with ${reply.error}`);
    return reply;
  }

  async fails(opcode: number, nodeId: bigint, body?: Uint8Array): Promise<number> {
    const reply = await this.call(opcode, nodeId, body);
    assert.ok(reply, `opcode ${opcode} got no reply`);
    assert.ok(reply.error < 0, `opcode ${opcode} should have failed`);
    return -reply.error;
  }

  async init(minor = 45, flags = 0x7fffffff): Promise<Reply> {
    const body = new Uint8Array(64);
    const view = new DataView(body.buffer);
    view.setUint32(0, 7, true);
    view.setUint32(4, minor, true);
    view.setUint32(8, 128 * 1024, true);
    view.setUint32(12, flags, true);
    return (await this.call(abi.FUSE_INIT, 0n, body))!;
  }

  async lookup(name: string): Promise<Reply | undefined> {
    return this.call(abi.FUSE_LOOKUP, abi.FUSE_ROOT_ID, cString(name));
  }

  async open(nodeId: bigint, flags = 2 /* O_RDWR */): Promise<bigint> {
    const reply = await this.ok(abi.FUSE_OPEN, nodeId, u32Pair(flags, 0));
    assert.equal(reply.view.getUint32(8, true) & abi.FOPEN_DIRECT_IO, abi.FOPEN_DIRECT_IO, "direct I/O");
    return reply.view.getBigUint64(0, true);
  }

  read(nodeId: bigint, handle: bigint, offset: bigint, lengthBytes: number): Promise<Reply | undefined> {
    const body = new Uint8Array(abi.FUSE_READ_IN_BYTES);
    const view = new DataView(body.buffer);
    view.setBigUint64(0, handle, true);
    view.setBigUint64(8, offset, true);
    view.setUint32(16, lengthBytes, true);
    return this.call(abi.FUSE_READ, nodeId, body);
  }

  write(nodeId: bigint, handle: bigint, offset: bigint, data: Uint8Array): Promise<Reply | undefined> {
    const body = new Uint8Array(abi.FUSE_WRITE_IN_BYTES + data.byteLength);
    const view = new DataView(body.buffer);
    view.setBigUint64(0, handle, true);
    view.setBigUint64(8, offset, true);
    view.setUint32(16, data.byteLength, true);
    body.set(data, abi.FUSE_WRITE_IN_BYTES);
    return this.call(abi.FUSE_WRITE, nodeId, body);
  }

  async readdir(
    handle: bigint,
    offset: bigint,
    sizeBytes: number,
  ): Promise<Array<{ name: string; next: bigint }>> {
    const body = new Uint8Array(abi.FUSE_READ_IN_BYTES);
    const view = new DataView(body.buffer);
    view.setBigUint64(0, handle, true);
    view.setBigUint64(8, offset, true);
    view.setUint32(16, sizeBytes, true);
    const reply = await this.ok(abi.FUSE_READDIR, abi.FUSE_ROOT_ID, body);
    const entries: Array<{ name: string; next: bigint }> = [];
    let at = 0;
    while (at < reply.body.byteLength) {
      const nameBytes = reply.view.getUint32(at + 16, true);
      const name = new TextDecoder().decode(reply.body.subarray(at + 24, at + 24 + nameBytes));
      entries.push({ name, next: reply.view.getBigUint64(at + 8, true) });
      at += abi.fuseRecordAlign(24 + nameBytes);
    }
    assert.equal(at, reply.body.byteLength, "dirents fill the reply exactly");
    return entries;
  }
}

function cString(text: string): Uint8Array {
  const bytes = new TextEncoder().encode(text);
  const result = new Uint8Array(bytes.byteLength + 1);
  result.set(bytes);
  return result;
}

function u32Pair(first: number, second: number): Uint8Array {
  const body = new Uint8Array(8);
  const view = new DataView(body.buffer);
  view.setUint32(0, first, true);
  view.setUint32(4, second, true);
  return body;
}

function nodeIdOf(reply: Reply): bigint {
  return reply.view.getBigUint64(0, true);
}

/** fuse_entry_out.attr.{ino,size,mode} */
function entryAttr(reply: Reply): { ino: bigint; size: bigint; mode: number } {
  return {
    ino: reply.view.getBigUint64(40, true),
    size: reply.view.getBigUint64(48, true),
    mode: reply.view.getUint32(40 + 60, true),
  };
}

function pattern(lengthBytes: number, seed: number): Uint8Array {
  const bytes = new Uint8Array(lengthBytes);
  let state = seed >>> 0 || 1;
  for (let index = 0; index < lengthBytes; index += 1) {
    state = (Math.imul(state, 1103515245) + 12345) >>> 0;
    bytes[index] = state >>> 24;
  }
  return bytes;
}

test("INIT negotiates 7.36 at most, large requests, async direct I/O and echoes readahead", async () => {
  const harness = new Harness();
  const offered =
    abi.FUSE_ASYNC_READ | abi.FUSE_ASYNC_DIO | abi.FUSE_MAX_PAGES | abi.FUSE_BIG_WRITES | (1 << 16);
  const reply = await harness.init(45, offered);
  assert.equal(reply.error, 0);
  const view = reply.view;
  assert.equal(view.getUint32(0, true), 7);
  assert.equal(view.getUint32(4, true), 36);
  assert.equal(view.getUint32(8, true), 128 * 1024, "max_readahead as offered");
  const flags = view.getUint32(12, true);
  assert.equal(flags & (1 << 16), 0, "no writeback cache: it would put a page cache between clients");
  assert.equal(flags & abi.FUSE_ASYNC_DIO, abi.FUSE_ASYNC_DIO);
  assert.equal(flags & abi.FUSE_MAX_PAGES, abi.FUSE_MAX_PAGES);
  assert.equal(view.getUint16(16, true), 16, "max_background");
  assert.equal(view.getUint32(20, true), maxWriteBytes, "max_write");
  assert.equal(view.getUint16(28, true), maxWriteBytes / 4096, "max_pages");
  await harness.session.initialized;
  const older = new Harness();
  assert.equal((await older.init(31, offered)).view.getUint32(4, true), 31, "an older kernel's minor wins");
});

test("INIT from a kernel older than 7.28 is refused and mount fails", async () => {
  const harness = new Harness();
  const reply = await harness.init(20);
  assert.equal(reply.error, -constants.errno.EPROTO);
  await assert.rejects(harness.session.initialized);
});

test("LOOKUP and GETATTR describe exports as files of the device size; unknown names are ENOENT", async () => {
  const harness = new Harness();
  await harness.init();
  harness.addExport("disk0", 1 << 20);
  harness.addExport("disk0@0b4c1a5e-0000-4000-8000-000000000001", 65536, true);
  const origin = (await harness.lookup("disk0"))!;
  assert.equal(origin.error, 0);
  assert.deepEqual(entryAttr(origin), { ino: nodeIdOf(origin), size: 1n << 20n, mode: 0o100600 });
  assert.ok(nodeIdOf(origin) > 1n);
  const image = (await harness.lookup("disk0@0b4c1a5e-0000-4000-8000-000000000001"))!;
  assert.equal(entryAttr(image).mode, 0o100400, "read-only exports are 0400");
  assert.notEqual(nodeIdOf(image), nodeIdOf(origin));
  assert.equal(nodeIdOf((await harness.lookup("disk0"))!), nodeIdOf(origin), "stable while the export lives");
  assert.equal(
    await harness.fails(abi.FUSE_LOOKUP, abi.FUSE_ROOT_ID, cString("nope")),
    constants.errno.ENOENT,
  );
  const attr = await harness.ok(abi.FUSE_GETATTR, nodeIdOf(origin), new Uint8Array(16));
  assert.equal(attr.view.getBigUint64(16 + 8, true), 1n << 20n);
  const root = await harness.ok(abi.FUSE_GETATTR, abi.FUSE_ROOT_ID, new Uint8Array(16));
  assert.equal(root.view.getUint32(16 + 60, true), 0o040755);
});

test("READ and WRITE round-trip, clamp at the end of the device and refuse writes past it", async () => {
  const harness = new Harness();
  await harness.init();
  const sizeBytes = 3 * 1024 * 1024 + 512;
  harness.addExport("disk0", sizeBytes);
  const nodeId = nodeIdOf((await harness.lookup("disk0"))!);
  const handle = await harness.open(nodeId);
  const data = pattern(maxWriteBytes, 7);
  const written = (await harness.write(nodeId, handle, 129024n, data))!;
  assert.equal(written.error, 0);
  assert.equal(written.view.getUint32(0, true), maxWriteBytes);
  const read = (await harness.read(nodeId, handle, 129024n, maxWriteBytes))!;
  assert.deepEqual(read.body, data);
  const tail = (await harness.read(nodeId, handle, BigInt(sizeBytes - 100), 4096))!;
  assert.equal(tail.body.byteLength, 100, "a read straddling the end is short");
  assert.equal((await harness.read(nodeId, handle, BigInt(sizeBytes), 4096))!.body.byteLength, 0, "EOF");
  assert.equal((await harness.read(nodeId, handle, 1n << 63n, 4096))!.body.byteLength, 0, "offset 2^63");
  const straddle = (await harness.write(nodeId, handle, BigInt(sizeBytes - 512), pattern(4096, 3)))!;
  assert.equal(straddle.view.getUint32(0, true), 512, "a write straddling the end is short");
  const past = (await harness.write(nodeId, handle, BigInt(sizeBytes), pattern(512, 3)))!;
  assert.equal(past.error, -constants.errno.ENOSPC);
  const huge = (await harness.write(nodeId, handle, 1n << 63n, pattern(512, 3)))!;
  assert.equal(huge.error, -constants.errno.ENOSPC);
  const fsync = new Uint8Array(16);
  new DataView(fsync.buffer).setBigUint64(0, handle, true);
  await harness.ok(abi.FUSE_FSYNC, nodeId, fsync);
  const flush = new Uint8Array(24);
  flush.set(fsync.subarray(0, 8));
  await harness.ok(abi.FUSE_FLUSH, nodeId, flush);
});

test("a vanished export answers EIO to open handles, ENOENT to lookups; re-adding it gives a new inode", async () => {
  const harness = new Harness();
  await harness.init();
  harness.addExport("disk0", 65536);
  harness.addExport("disk1", 65536);
  const first = nodeIdOf((await harness.lookup("disk0"))!);
  const handle = await harness.open(first);
  const other = nodeIdOf((await harness.lookup("disk1"))!);
  const otherHandle = await harness.open(other);
  harness.source.remove("disk0");
  harness.session.reconcile();
  assert.equal((await harness.read(first, handle, 0n, 4096))!.error, -constants.errno.EIO);
  assert.equal((await harness.write(first, handle, 0n, pattern(512, 1)))!.error, -constants.errno.EIO);
  assert.equal((await harness.lookup("disk0"))!.error, -constants.errno.ENOENT);
  assert.equal((await harness.read(other, otherHandle, 0n, 4096))!.error, 0, "other exports keep working");
  harness.addExport("disk0", 65536);
  const second = nodeIdOf((await harness.lookup("disk0"))!);
  assert.notEqual(second, first, "a new export under an old name is a new inode");
  assert.equal(
    (await harness.read(first, handle, 0n, 4096))!.error,
    -constants.errno.EIO,
    "old handle stays dead",
  );
  // The dead node is dropped once the kernel forgets it and the handle is released.
  const sizeBefore = harness.session.table.size;
  const release = new Uint8Array(24);
  new DataView(release.buffer).setBigUint64(0, handle, true);
  await harness.ok(abi.FUSE_RELEASE, first, release);
  const forget = new Uint8Array(8);
  new DataView(forget.buffer).setBigUint64(0, 1n, true);
  assert.equal(await harness.call(abi.FUSE_FORGET, first, forget), undefined, "FORGET takes no reply");
  assert.equal(harness.session.table.size, sizeBefore - 1);
});

test("an export replaced without a change event is still noticed by the next lookup", async () => {
  const harness = new Harness();
  await harness.init();
  harness.addExport("disk0", 65536);
  const first = nodeIdOf((await harness.lookup("disk0"))!);
  const handle = await harness.open(first);
  harness.addExport("disk0", 131072);
  const second = (await harness.lookup("disk0"))!;
  assert.notEqual(nodeIdOf(second), first);
  assert.equal(entryAttr(second).size, 131072n);
  assert.equal((await harness.read(first, handle, 0n, 512))!.error, -constants.errno.EIO);
});

test("READDIR lists every current export, resumes at its offset and restarts fresh at offset 0", async () => {
  const harness = new Harness();
  await harness.init();
  const names = Array.from({ length: 40 }, (_, index) => `disk${index}@snapshot-${index}`);
  for (const name of names) harness.addExport(name, 4096);
  const handle = (await harness.ok(abi.FUSE_OPENDIR, abi.FUSE_ROOT_ID, u32Pair(0, 0))).view.getBigUint64(
    0,
    true,
  );
  const seen: string[] = [];
  let offset = 0n;
  for (let pass = 0; pass < 100; pass += 1) {
    const entries = await harness.readdir(handle, offset, 256);
    if (entries.length === 0) break;
    seen.push(...entries.map((entry) => entry.name));
    offset = entries.at(-1)!.next;
  }
  assert.deepEqual(seen, [".", "..", ...names]);
  harness.source.remove(names[0]!);
  harness.addExport("late", 4096);
  const fresh = (await harness.readdir(handle, 0n, 65536)).map((entry) => entry.name);
  assert.deepEqual(fresh, [".", "..", ...names.slice(1), "late"]);
  await harness.ok(abi.FUSE_RELEASEDIR, abi.FUSE_ROOT_ID, new Uint8Array(24));
});

test("SETATTR refuses size, mode and owner changes and accepts times; O_TRUNC-style truncation fails", async () => {
  const harness = new Harness();
  await harness.init();
  harness.addExport("disk0", 65536);
  const nodeId = nodeIdOf((await harness.lookup("disk0"))!);
  const setattr = (valid: number, sizeBytes: bigint, mode = 0) => {
    const body = new Uint8Array(abi.FUSE_SETATTR_IN_BYTES);
    const view = new DataView(body.buffer);
    view.setUint32(0, valid, true);
    view.setBigUint64(16, sizeBytes, true);
    view.setUint32(68, mode, true);
    return body;
  };
  assert.equal(
    await harness.fails(abi.FUSE_SETATTR, nodeId, setattr(abi.FATTR_SIZE, 0n)),
    constants.errno.EPERM,
  );
  assert.equal(
    await harness.fails(abi.FUSE_SETATTR, nodeId, setattr(abi.FATTR_MODE, 0n, 0o644)),
    constants.errno.EPERM,
  );
  const same = await harness.ok(abi.FUSE_SETATTR, nodeId, setattr(abi.FATTR_SIZE, 65536n));
  assert.equal(same.view.getBigUint64(16 + 8, true), 65536n);
  await harness.ok(abi.FUSE_SETATTR, nodeId, setattr((1 << 4) | (1 << 5), 0n));
});

test("read-only exports refuse writable opens with EACCES and serve reads", async () => {
  const harness = new Harness();
  await harness.init();
  harness.addExport("image", 65536, true);
  const nodeId = nodeIdOf((await harness.lookup("image"))!);
  assert.equal(await harness.fails(abi.FUSE_OPEN, nodeId, u32Pair(2, 0)), constants.errno.EACCES);
  const handle = await harness.open(nodeId, 0);
  assert.equal((await harness.read(nodeId, handle, 0n, 4096))!.body.byteLength, 4096);
  const access = await harness.fails(abi.FUSE_ACCESS, nodeId, u32Pair(abi.W_OK, 0));
  assert.equal(access, constants.errno.EACCES);
});

test("FALLOCATE zero-range zeroes the range; punch-hole (discard) is refused untouched; allocation is a no-op; growth is refused", async () => {
  const harness = new Harness();
  await harness.init();
  harness.addExport("disk0", 1 << 20);
  const nodeId = nodeIdOf((await harness.lookup("disk0"))!);
  const handle = await harness.open(nodeId);
  await harness.write(nodeId, handle, 0n, pattern(1 << 20, 9));
  const fallocate = (offset: bigint, length: bigint, mode: number) => {
    const body = new Uint8Array(abi.FUSE_FALLOCATE_IN_BYTES);
    const view = new DataView(body.buffer);
    view.setBigUint64(0, handle, true);
    view.setBigUint64(8, offset, true);
    view.setBigUint64(16, length, true);
    view.setUint32(24, mode, true);
    return body;
  };
  const punch = abi.FALLOC_FL_PUNCH_HOLE | abi.FALLOC_FL_KEEP_SIZE;
  const zero = abi.FALLOC_FL_ZERO_RANGE | abi.FALLOC_FL_KEEP_SIZE;
  assert.equal(
    await harness.fails(abi.FUSE_FALLOCATE, nodeId, fallocate(4096n, 8192n, punch)),
    constants.errno.EOPNOTSUPP,
  );
  await harness.ok(abi.FUSE_FALLOCATE, nodeId, fallocate(65536n, 512n, abi.FALLOC_FL_ZERO_RANGE));
  await harness.ok(abi.FUSE_FALLOCATE, nodeId, fallocate(0n, 4096n, 0));
  await harness.ok(abi.FUSE_FALLOCATE, nodeId, fallocate(1n << 19n, 1n << 40n, zero));
  const grow = await harness.fails(abi.FUSE_FALLOCATE, nodeId, fallocate(0n, 2n << 20n, 0));
  assert.equal(grow, constants.errno.EFBIG);
  const expected = pattern(1 << 20, 9);
  expected.fill(0, 65536, 65536 + 512);
  expected.fill(0, 1 << 19);
  assert.deepEqual((await harness.read(nodeId, handle, 0n, 1 << 20))!.body, expected);
});

test("unknown opcodes answer ENOSYS, INTERRUPT takes no reply, requests before INIT fail", async () => {
  const harness = new Harness();
  assert.equal(
    await harness.fails(abi.FUSE_GETATTR, abi.FUSE_ROOT_ID, new Uint8Array(16)),
    constants.errno.EIO,
  );
  await harness.init();
  assert.equal(
    await harness.fails(9 /* MKDIR */, abi.FUSE_ROOT_ID, new Uint8Array(16)),
    constants.errno.ENOSYS,
  );
  assert.equal(await harness.call(abi.FUSE_INTERRUPT, 0n, new Uint8Array(8)), undefined);
  const statfs = await harness.ok(abi.FUSE_STATFS, abi.FUSE_ROOT_ID);
  assert.equal(statfs.body.byteLength, abi.FUSE_STATFS_OUT_BYTES);
  await harness.ok(abi.FUSE_DESTROY, 0n);
  assert.equal(harness.session.isDestroyed, true);
});

test("OPEN of a device with a direct-read descriptor registers it before the reply; RELEASE and a vanished export withdraw it", async () => {
  const harness = new Harness();
  await harness.init();
  const device = new CheckedDevice(Object.assign(new MemoryBackend(1 << 20), { directReadFd: () => 42 }));
  harness.source.add({ name: "disk0", description: "file origin", device, readOnly: false });
  harness.addExport("disk0@image", 1 << 20);
  const origin = nodeIdOf((await harness.lookup("disk0"))!);
  const image = nodeIdOf((await harness.lookup("disk0@image"))!);
  harness.events.length = 0;

  const first = await harness.open(origin);
  assert.deepEqual(harness.events.slice(0, 1), [`open ${first} fd 42 size ${1 << 20}`]);
  assert.match(harness.events[1] ?? "", /^reply /, "registered before the OPEN is answered");
  const imageHandle = await harness.open(image);
  await harness.ok(abi.FUSE_READ, image, readIn(imageHandle, 0n, 4096));
  assert.ok(
    !harness.events.some((event) => event.startsWith(`open ${imageHandle}`)),
    "no descriptor: no registration",
  );

  harness.events.length = 0;
  await harness.ok(abi.FUSE_RELEASE, origin, u64(first));
  assert.deepEqual(
    harness.events.slice(0, 1),
    [`close ${first}`],
    "withdrawn before the RELEASE is answered",
  );
  assert.equal(harness.events.length, 2);

  const second = await harness.open(origin);
  harness.events.length = 0;
  harness.source.remove("disk0");
  harness.session.reconcile(); // FuseServer calls it on source.onExportsChanged
  assert.deepEqual(harness.events, [`close ${second}`], "a vanished export is withdrawn at once");
  assert.equal(await harness.fails(abi.FUSE_READ, origin, readIn(second, 0n, 4096)), constants.errno.EIO);
  harness.events.length = 0;
  await harness.ok(abi.FUSE_RELEASE, origin, u64(second));
  assert.ok(!harness.events.some((event) => event.startsWith("close")), "withdrawn only once");
});

function readIn(handle: bigint, offset: bigint, lengthBytes: number): Uint8Array {
  const body = new Uint8Array(abi.FUSE_READ_IN_BYTES);
  const view = new DataView(body.buffer);
  view.setBigUint64(0, handle, true);
  view.setBigUint64(8, offset, true);
  view.setUint32(16, lengthBytes, true);
  return body;
}

function u64(value: bigint): Uint8Array {
  const body = new Uint8Array(24); // fuse_release_in
  new DataView(body.buffer).setBigUint64(0, value, true);
  return body;
}

import assert from "node:assert/strict";
import { test } from "node:test";
import { MemoryBackend } from "../backends/memory-backend.js";
import { CheckedDevice } from "../block/checked-device.js";
import {
  NBD_CMD_BLOCK_STATUS,
  NBD_CMD_CACHE,
  NBD_CMD_DISC,
  NBD_CMD_FLAG_DF,
  NBD_CMD_FLAG_FAST_ZERO,
  NBD_CMD_FLAG_FUA,
  NBD_CMD_FLAG_NO_HOLE,
  NBD_CMD_FLAG_REQ_ONE,
  NBD_CMD_FLUSH,
  NBD_CMD_READ,
  NBD_CMD_TRIM,
  NBD_CMD_WRITE,
  NBD_CMD_WRITE_ZEROES,
  NBD_FLAG_HAS_FLAGS,
  NBD_FLAG_SEND_DF,
  NBD_FLAG_SEND_FAST_ZERO,
  NBD_FLAG_SEND_FUA,
  NBD_FLAG_SEND_TRIM,
  NBD_FLAG_SEND_WRITE_ZEROES,
} from "./nbd-protocol.js";
import type { NbdSession } from "./nbd-session.js";
import { offsetBytesOf, validateRequest } from "./request-validation.js";

const allFlags =
  NBD_FLAG_HAS_FLAGS |
  NBD_FLAG_SEND_FUA |
  NBD_FLAG_SEND_TRIM |
  NBD_FLAG_SEND_WRITE_ZEROES |
  NBD_FLAG_SEND_DF |
  NBD_FLAG_SEND_FAST_ZERO;

function session(overrides: Partial<NbdSession> = {}): NbdSession {
  return {
    exportName: "disk",
    device: new CheckedDevice(new MemoryBackend(1 << 20)),
    sizeBytes: 1 << 20,
    isReadOnly: false,
    transmissionFlags: allFlags,
    structuredReplies: true,
    baseAllocationContextId: 1,
    metaContexts: [],
    requestLengthBytesMax: 32 << 20,
    ...overrides,
  };
}

/** Splits a u64 BigInt into the two u32 halves the wire parser produces. */
function validate(s: NbdSession, command: number, flags: number, offset: bigint, lengthBytes: number) {
  return validateRequest(
    s,
    command,
    flags,
    Number(offset >> 32n),
    Number(offset & 0xffff_ffffn),
    lengthBytes,
  );
}

test("offsetBytesOf is exact below 2^53 and refuses everything from 2^53 on", () => {
  const halves = (value: bigint) => [Number(value >> 32n), Number(value & 0xffff_ffffn)] as const;
  for (const value of [0n, 1n, 2n ** 32n - 1n, 2n ** 32n, 2n ** 53n - 1n]) {
    assert.equal(offsetBytesOf(...halves(value)), Number(value));
    assert.equal(BigInt(offsetBytesOf(...halves(value))), value);
  }
  for (const value of [2n ** 53n, 2n ** 53n + 1n, 2n ** 63n, 2n ** 64n - 1n]) {
    assert.equal(offsetBytesOf(...halves(value)), -1);
  }
});

test("validateRequest accepts in-range requests of every command", () => {
  const s = session();
  assert.equal(validate(s, NBD_CMD_READ, 0, 0n, 4096), undefined);
  assert.equal(validate(s, NBD_CMD_READ, NBD_CMD_FLAG_DF | NBD_CMD_FLAG_FUA, (1n << 20n) - 1n, 1), undefined);
  assert.equal(validate(s, NBD_CMD_WRITE, NBD_CMD_FLAG_FUA, 0n, 1 << 20), undefined);
  assert.equal(validate(s, NBD_CMD_FLUSH, 0, 0n, 0), undefined);
  assert.equal(validate(s, NBD_CMD_DISC, 0, 0n, 0), undefined);
  assert.equal(validate(s, NBD_CMD_TRIM, 0, 4096n, 4096), undefined);
  assert.equal(validate(s, NBD_CMD_CACHE, 0, 0n, 1 << 20), undefined);
  const zeroFlags = NBD_CMD_FLAG_NO_HOLE | NBD_CMD_FLAG_FAST_ZERO | NBD_CMD_FLAG_FUA;
  assert.equal(validate(s, NBD_CMD_WRITE_ZEROES, zeroFlags, 0n, 1 << 20), undefined);
  assert.equal(validate(s, NBD_CMD_BLOCK_STATUS, NBD_CMD_FLAG_REQ_ONE, 0n, 1 << 20), undefined);
});

test("validateRequest: past the end is ENOSPC for WRITE/WRITE_ZEROES and EINVAL otherwise, at any u64", () => {
  const s = session();
  for (const offset of [1n << 20n, (1n << 20n) - 1n, 2n ** 53n - 1n, 2n ** 53n, 2n ** 63n, 2n ** 64n - 1n]) {
    assert.equal(validate(s, NBD_CMD_WRITE, 0, offset, 2), "ENOSPC", `WRITE at ${offset}`);
    assert.equal(validate(s, NBD_CMD_WRITE_ZEROES, 0, offset, 2), "ENOSPC");
    assert.equal(validate(s, NBD_CMD_READ, 0, offset, 2), "EINVAL", `READ at ${offset}`);
    assert.equal(validate(s, NBD_CMD_TRIM, 0, offset, 2), "EINVAL");
    assert.equal(validate(s, NBD_CMD_CACHE, 0, offset, 2), "EINVAL");
    assert.equal(validate(s, NBD_CMD_BLOCK_STATUS, 0, offset, 2), "EINVAL");
  }
  assert.equal(validate(s, NBD_CMD_READ, 0, 0n, 0xffff_ffff), "EINVAL");
});

test("validateRequest refuses zero lengths, oversize payloads, bad FLUSH/DISC arguments", () => {
  const s = session({ requestLengthBytesMax: 65536, sizeBytes: 1 << 30 });
  for (const command of [
    NBD_CMD_READ,
    NBD_CMD_WRITE,
    NBD_CMD_TRIM,
    NBD_CMD_WRITE_ZEROES,
    NBD_CMD_BLOCK_STATUS,
    NBD_CMD_CACHE,
  ]) {
    assert.equal(validate(s, command, 0, 0n, 0), "EINVAL", `zero length, command ${command}`);
  }
  assert.equal(validate(s, NBD_CMD_READ, 0, 0n, 65537), "EINVAL");
  assert.equal(validate(s, NBD_CMD_WRITE, 0, 0n, 65537), "EINVAL");
  // Commands without payload may exceed the maximum payload.
  assert.equal(validate(s, NBD_CMD_TRIM, 0, 0n, 1 << 24), undefined);
  assert.equal(validate(s, NBD_CMD_BLOCK_STATUS, 0, 0n, 1 << 24), undefined);
  assert.equal(validate(s, NBD_CMD_FLUSH, 0, 1n, 0), "EINVAL");
  assert.equal(validate(s, NBD_CMD_FLUSH, 0, 2n ** 32n, 0), "EINVAL");
  assert.equal(validate(s, NBD_CMD_FLUSH, 0, 0n, 1), "EINVAL");
  assert.equal(validate(s, NBD_CMD_DISC, 0, 0n, 1), "EINVAL");
});

test("validateRequest refuses unknown commands and flags, flags on the wrong command, unadvertised flags", () => {
  const s = session();
  assert.equal(validate(s, 8, 0, 0n, 512), "EINVAL");
  assert.equal(validate(s, 9, 0, 0n, 512), "EINVAL");
  assert.equal(validate(s, 0xffff, 0, 0n, 512), "EINVAL");
  assert.equal(validate(s, NBD_CMD_READ, 0x8000, 0n, 512), "EINVAL");
  assert.equal(validate(s, NBD_CMD_READ, 1 << 5, 0n, 512), "EINVAL");
  assert.equal(validate(s, NBD_CMD_READ, NBD_CMD_FLAG_REQ_ONE, 0n, 512), "EINVAL");
  assert.equal(validate(s, NBD_CMD_READ, NBD_CMD_FLAG_NO_HOLE, 0n, 512), "EINVAL");
  assert.equal(validate(s, NBD_CMD_WRITE, NBD_CMD_FLAG_DF, 0n, 512), "EINVAL");
  assert.equal(validate(s, NBD_CMD_WRITE, NBD_CMD_FLAG_FAST_ZERO, 0n, 512), "EINVAL");
  const bare = session({
    transmissionFlags: NBD_FLAG_HAS_FLAGS,
    structuredReplies: false,
    baseAllocationContextId: 0,
  });
  assert.equal(validate(bare, NBD_CMD_READ, NBD_CMD_FLAG_DF, 0n, 512), "EINVAL");
  assert.equal(validate(bare, NBD_CMD_WRITE, NBD_CMD_FLAG_FUA, 0n, 512), "EINVAL");
  assert.equal(validate(bare, NBD_CMD_WRITE_ZEROES, 0, 0n, 512), "EINVAL");
  assert.equal(validate(bare, NBD_CMD_TRIM, 0, 0n, 512), "EINVAL");
  assert.equal(validate(bare, NBD_CMD_BLOCK_STATUS, 0, 0n, 512), "EINVAL");
  const zeroNoFast = session({ transmissionFlags: allFlags & ~NBD_FLAG_SEND_FAST_ZERO });
  assert.equal(validate(zeroNoFast, NBD_CMD_WRITE_ZEROES, NBD_CMD_FLAG_FAST_ZERO, 0n, 512), "EINVAL");
  assert.equal(validate(zeroNoFast, NBD_CMD_WRITE_ZEROES, NBD_CMD_FLAG_NO_HOLE, 0n, 512), undefined);
  const noContext = session({ baseAllocationContextId: 0 });
  assert.equal(validate(noContext, NBD_CMD_BLOCK_STATUS, 0, 0n, 512), "EINVAL");
  const dirtyOnly = session({
    baseAllocationContextId: 0,
    metaContexts: [{ id: 2, context: { name: "qemu:dirty-bitmap:x", extents: async () => [] } }],
  });
  assert.equal(validate(dirtyOnly, NBD_CMD_BLOCK_STATUS, 0, 0n, 512), undefined, "any context will do");
});

test("validateRequest refuses modifications of a read-only export with EPERM, even past the end", () => {
  const s = session({ isReadOnly: true });
  assert.equal(validate(s, NBD_CMD_WRITE, 0, 0n, 512), "EPERM");
  assert.equal(validate(s, NBD_CMD_WRITE, 0, 2n ** 63n, 512), "EPERM");
  assert.equal(validate(s, NBD_CMD_TRIM, 0, 0n, 512), "EPERM");
  assert.equal(validate(s, NBD_CMD_WRITE_ZEROES, 0, 0n, 512), "EPERM");
  assert.equal(validate(s, NBD_CMD_READ, 0, 0n, 512), undefined);
  assert.equal(validate(s, NBD_CMD_FLUSH, 0, 0n, 0), undefined);
});

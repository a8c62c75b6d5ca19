import assert from "node:assert/strict";
import { test } from "node:test";
import { MemoryBackend } from "../backends/memory-backend.js";
import { CheckedDevice } from "./checked-device.js";
import { BlockError } from "./errors.js";

function errnoOf(promise: Promise<unknown>): Promise<string> {
  return promise.then(
    () => "resolved",
    (error: unknown) => (error instanceof BlockError ? error.errno : `not a BlockError: ${String(error)}`),
  );
}

test("CheckedDevice refuses ranges past the end with the spec's errno per operation", async () => {
  const device = new CheckedDevice(new MemoryBackend(4096));
  assert.equal(await errnoOf(device.read(4000, new Uint8Array(200))), "EINVAL");
  assert.equal(await errnoOf(device.write(4000, new Uint8Array(200))), "ENOSPC");
  assert.equal(await errnoOf(device.writeZeroes(4096, 1)), "ENOSPC");
  assert.equal(await errnoOf(device.trim(0, 8192)), "EINVAL");
  assert.equal(await errnoOf(device.read(-1, new Uint8Array(1))), "EINVAL");
  assert.equal(await errnoOf(device.read(0, new Uint8Array(0))), "EINVAL");
  assert.equal(await errnoOf(device.read(2 ** 60, new Uint8Array(1))), "EINVAL");
  assert.equal(await errnoOf(device.read(4095, new Uint8Array(1))), "resolved");
});

test("CheckedDevice read-only view refuses every modification with EPERM and still reads", async () => {
  const backend = new MemoryBackend(8192);
  await backend.write(0, new Uint8Array([7, 7, 7]));
  const device = new CheckedDevice(backend, { readOnly: true });
  assert.equal(device.capabilities.canWrite, false);
  assert.equal(await errnoOf(device.write(0, new Uint8Array(1))), "EPERM");
  assert.equal(await errnoOf(device.writeZeroes(0, 1)), "EPERM");
  assert.equal(await errnoOf(device.trim(0, 1)), "EPERM");
  const target = new Uint8Array(3);
  await device.read(0, target);
  assert.deepEqual([...target], [7, 7, 7]);
});

test("CheckedDevice reports one data extent for devices without extents", async () => {
  const inner = new MemoryBackend(1 << 20);
  const device = new CheckedDevice({
    sizeBytes: inner.sizeBytes,
    capabilities: { ...inner.capabilities, canExtents: false },
    read: (o, t) => inner.read(o, t),
    write: (o, s) => inner.write(o, s),
    writeZeroes: (o, l) => inner.writeZeroes(o, l),
    trim: (o, l) => inner.trim(o, l),
    flush: () => inner.flush(),
  });
  assert.deepEqual(await device.extents(0, 4096), [{ lengthBytes: 4096, isHole: false, isZero: false }]);
});

import assert from "node:assert/strict";
import { test } from "node:test";
import { BlockError } from "../block/errors.js";
import { CbtMap } from "./cbt-map.js";
import { decodeCbtState, encodeCbtState } from "./cbt-state-codec.js";

const block = 64 * 1024;

function sampleMap(): CbtMap {
  const cbt = new CbtMap(32 * block, block);
  cbt.set(0, 1);
  cbt.switchAtTake(32 * block);
  cbt.set(5 * block, 3 * block);
  cbt.setBoth(20 * block, block);
  return cbt;
}

test("a CBT state survives encode/decode exactly, and fromState gives the same map", () => {
  const cbt = sampleMap();
  const identity = { kind: "file", ino: "42" };
  const decoded = decodeCbtState(encodeCbtState({ state: cbt.exportState(), backendIdentity: identity }));
  assert.deepEqual(decoded.backendIdentity, identity);
  assert.deepEqual(decoded.state, cbt.exportState());
  const restored = CbtMap.fromState(decoded.state, 32 * block, block);
  assert.deepEqual({ ...restored.info(), generationReason: "" }, { ...cbt.info(), generationReason: "" });
  assert.equal(restored.generationReason, "restored");
  assert.deepEqual(restored.readMapCopy(), cbt.readMapCopy());
  assert.deepEqual(restored.writeMapCopy(), cbt.writeMapCopy());
});

test("every single-byte corruption and every truncation of a state is refused", () => {
  const bytes = encodeCbtState({ state: sampleMap().exportState(), backendIdentity: {} });
  for (let index = 0; index < bytes.length; index++) {
    const damaged = Buffer.from(bytes);
    damaged[index] = (damaged[index] ?? 0) ^ 0x40;
    assert.throws(() => decodeCbtState(damaged), BlockError, `byte ${index}`);
  }
  for (const length of [0, 7, 16, bytes.length - 33, bytes.length - 1]) {
    assert.throws(() => decodeCbtState(bytes.subarray(0, length)), BlockError, `length ${length}`);
  }
});

test("a state that does not fit the device now starts a new generation saying why", () => {
  const state = sampleMap().exportState();
  const grown = CbtMap.fromState(state, 64 * block, block);
  assert.notEqual(grown.generationId, state.generationId);
  assert.equal(
    grown.generationReason,
    `untrusted: device size changed from ${32 * block} to ${64 * block} bytes`,
  );
  assert.equal(grown.changesNumber, 0);
  const otherBlock = CbtMap.fromState(state, 32 * block, 2 * block);
  assert.match(otherBlock.generationReason, /^untrusted: CBT block size changed/);
});

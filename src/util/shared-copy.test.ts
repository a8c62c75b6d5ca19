import assert from "node:assert/strict";
import { test } from "node:test";
import { copyBytes } from "./shared-copy.js";

test("copyBytes copies exactly, at every alignment, between ordinary and shared memory", () => {
  const source = Buffer.from(Array.from({ length: 200_000 }, (_, index) => (index * 7 + 3) & 0xff));
  const shared = new Uint8Array(new SharedArrayBuffer(210_000));
  const plain = new Uint8Array(210_000);
  for (const sourceOffset of [0, 1, 4, 7, 28]) {
    for (const targetOffset of [0, 3, 8, 13]) {
      for (const lengthBytes of [0, 100, 4096, 70_000, 150_001]) {
        const piece = source.subarray(sourceOffset, sourceOffset + lengthBytes);
        for (const target of [shared, plain]) {
          target.fill(0xee);
          copyBytes(target, targetOffset, piece);
          assert.ok(Buffer.from(target.buffer, target.byteOffset + targetOffset, lengthBytes).equals(piece));
          assert.equal(target[targetOffset + lengthBytes], 0xee, "nothing written past the end");
          if (targetOffset > 0) assert.equal(target[targetOffset - 1], 0xee, "nothing written before");
        }
        const back = new Uint8Array(lengthBytes + 5);
        shared.set(piece, targetOffset);
        copyBytes(back, 5, shared.subarray(targetOffset, targetOffset + lengthBytes));
        assert.ok(Buffer.from(back.buffer, 5, lengthBytes).equals(piece), "out of shared memory too");
      }
    }
  }
});

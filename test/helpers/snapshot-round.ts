/**
 * The check that ends a round of the engine's race tests: after concurrent origin writes and image reads
 * against a snapshot taken over a device filled with `before`, every image read made during the round and
 * the whole image read now hold only `before` (nothing written after the take leaked in), and the origin
 * holds exactly what the round wrote (`model`). `context` names the round and seed in failure messages.
 */
import assert from "node:assert/strict";
import type { BlockDevice } from "../../src/block/device.js";

export async function assertSnapshotRoundHeld(options: {
  readonly image: BlockDevice;
  readonly origin: BlockDevice;
  readonly imageReads: readonly Uint8Array[];
  readonly before: number;
  readonly model: Uint8Array;
  readonly context: string;
}): Promise<void> {
  const { image, origin, imageReads, before, model, context } = options;
  const imageNow = new Uint8Array(model.byteLength);
  await image.read(0, imageNow);
  for (const view of [...imageReads, imageNow]) {
    const leaked = view.findIndex((byte) => byte !== before);
    assert.equal(leaked, -1, `${context}: the image showed byte ${view[leaked]} instead of ${before}`);
  }
  const originNow = new Uint8Array(model.byteLength);
  await origin.read(0, originNow);
  assert.deepEqual(originNow, model, `${context}: the origin differs from the writes`);
}

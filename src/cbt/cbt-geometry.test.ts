import { AssertionError } from "node:assert";
import assert from "node:assert/strict";
import { test } from "node:test";
import {
  cbtBlockCountTarget,
  cbtBlockSizeBytesMax,
  cbtBlockSizeBytesMin,
  cbtGeometry,
  isValidCbtBlockSize,
} from "./cbt-geometry.js";

const KiB = 1024;
const MiB = 1024 * KiB;
const GiB = 1024 * MiB;
const TiB = 1024 * GiB;

/**
 * blksnap's cbt_map_calculate_block_size transcribed literally from the reference (§1.3): shifts and
 * 512-byte sectors, BigInt arithmetic. An independent second implementation to compare against.
 */
function referenceGeometry(deviceSizeBytes: number): { blockSizeBytes: number; blockCount: number } {
  const minimumShift = 16n;
  const maximumShift = 26n;
  const maximumCount = 2_097_152n;
  const capacitySectors = BigInt(Math.ceil(deviceSizeBytes / 512));
  const ceilDiv = (a: bigint, b: bigint): bigint => (a + b - 1n) / b;
  let shift = minimumShift;
  let count = ceilDiv(capacitySectors, 1n << (shift - 9n));
  while (count > maximumCount) {
    if (shift >= maximumShift) break;
    shift++;
    count = ceilDiv(capacitySectors, 1n << (shift - 9n));
  }
  return { blockSizeBytes: Number(1n << shift), blockCount: Number(count) };
}

test("CBT geometry matches blksnap's published examples", () => {
  assert.deepEqual(cbtGeometry(64 * MiB), { blockSizeBytes: 64 * KiB, blockCount: 1024 });
  assert.deepEqual(cbtGeometry(4 * GiB), { blockSizeBytes: 64 * KiB, blockCount: 65536 });
  assert.deepEqual(cbtGeometry(128 * GiB), { blockSizeBytes: 64 * KiB, blockCount: 2_097_152 });
  assert.deepEqual(cbtGeometry(1 * TiB), { blockSizeBytes: 512 * KiB, blockCount: 2_097_152 });
});

test("CBT geometry doubles the block just past the target count", () => {
  // One byte more than 128 GiB needs one block too many at 64 KiB: the block doubles to 128 KiB.
  assert.deepEqual(cbtGeometry(128 * GiB + 1), { blockSizeBytes: 128 * KiB, blockCount: 1_048_577 });
});

test("CBT geometry of a device above 128 TiB stops at 64 MiB blocks and exceeds the target count", () => {
  const geometry = cbtGeometry(256 * TiB);
  assert.equal(geometry.blockSizeBytes, 64 * MiB);
  assert.equal(geometry.blockSizeBytes, cbtBlockSizeBytesMax);
  assert.equal(geometry.blockCount, 4_194_304);
  assert.ok(geometry.blockCount > cbtBlockCountTarget);
  // Exactly 128 TiB still fits the target with 64 MiB blocks.
  assert.deepEqual(cbtGeometry(128 * TiB), { blockSizeBytes: 64 * MiB, blockCount: cbtBlockCountTarget });
});

test("CBT geometry counts a last partial block", () => {
  assert.deepEqual(cbtGeometry(10 * 64 * KiB + 1), { blockSizeBytes: 64 * KiB, blockCount: 11 });
  assert.deepEqual(cbtGeometry(512), { blockSizeBytes: 64 * KiB, blockCount: 1 });
  assert.deepEqual(cbtGeometry(1 * TiB + 4096), { blockSizeBytes: 1 * MiB, blockCount: 1_048_577 });
  assert.deepEqual(cbtGeometry(0), { blockSizeBytes: 64 * KiB, blockCount: 0 });
});

test("CBT geometry agrees with a literal transcription of blksnap's algorithm over many sizes", () => {
  let seed = 12345;
  const random = (): number => {
    seed = (seed * 1103515245 + 12345) % 2 ** 31;
    return seed / 2 ** 31;
  };
  const sizes: number[] = [];
  for (let exponent = 9; exponent <= 49; exponent++) {
    const base = 2 ** exponent;
    sizes.push(base - 512, base, base + 512);
  }
  for (let i = 0; i < 200; i++) sizes.push(Math.floor(random() * 2 ** (random() * 40)) * 512);
  for (const sizeBytes of sizes) {
    if (sizeBytes < 0) continue;
    const geometry = cbtGeometry(sizeBytes);
    assert.deepEqual(geometry, referenceGeometry(sizeBytes), `device of ${sizeBytes} bytes`);
    assert.ok(
      geometry.blockSizeBytes >= cbtBlockSizeBytesMin && geometry.blockSizeBytes <= cbtBlockSizeBytesMax,
    );
    // The blocks cover the device, and one block less would not.
    assert.ok(geometry.blockCount * geometry.blockSizeBytes >= sizeBytes);
    assert.ok((geometry.blockCount - 1) * geometry.blockSizeBytes < sizeBytes || sizeBytes === 0);
  }
});

test("CBT block size override: powers of two from 4 KiB to 64 MiB only", () => {
  for (let sizeBytes = 4 * KiB; sizeBytes <= 64 * MiB; sizeBytes *= 2) {
    assert.equal(isValidCbtBlockSize(sizeBytes), true, `${sizeBytes}`);
  }
  for (const sizeBytes of [0, -4096, 2 * KiB, 128 * MiB, 3 * 4096, 65536 + 4096, 4096.5, Number.NaN, 1]) {
    assert.equal(isValidCbtBlockSize(sizeBytes), false, `${sizeBytes}`);
  }
  assert.deepEqual(cbtGeometry(10 * MiB + 1, 4 * KiB), { blockSizeBytes: 4 * KiB, blockCount: 2561 });
  // An override is used as given, even where the rule would pick a bigger block.
  assert.deepEqual(cbtGeometry(1 * TiB, 64 * KiB), { blockSizeBytes: 64 * KiB, blockCount: 16_777_216 });
  assert.throws(() => cbtGeometry(MiB, 3 * 4096), AssertionError);
  assert.throws(() => cbtGeometry(MiB, 2 * KiB), AssertionError);
  assert.throws(() => cbtGeometry(-1), AssertionError);
  assert.throws(() => cbtGeometry(1.5), AssertionError);
});

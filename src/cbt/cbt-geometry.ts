/**
 * blksnap's CBT block-size rule (cbt_map_calculate_block_size): start at 64 KiB and double the block until
 * the device needs at most 2,097,152 blocks, never above 64 MiB (the count may then exceed the target).
 */
import { assert } from "../util/assert.js";

export const cbtBlockSizeBytesMin = 64 * 1024;
export const cbtBlockSizeBytesMax = 64 * 1024 * 1024;
export const cbtBlockCountTarget = 2_097_152;
/** Smallest block size accepted as an explicit override (one page). */
export const cbtBlockSizeBytesOverrideMin = 4096;

export interface CbtGeometry {
  readonly blockSizeBytes: number;
  readonly blockCount: number;
}

export function cbtGeometry(deviceSizeBytes: number, blockSizeBytesOverride?: number): CbtGeometry {
  assert(Number.isSafeInteger(deviceSizeBytes) && deviceSizeBytes >= 0, "device size must be a safe integer");
  if (blockSizeBytesOverride !== undefined) {
    assert(
      isValidCbtBlockSize(blockSizeBytesOverride),
      "CBT block size override must be validated by the caller",
    );
    return {
      blockSizeBytes: blockSizeBytesOverride,
      blockCount: Math.ceil(deviceSizeBytes / blockSizeBytesOverride),
    };
  }
  let blockSizeBytes = cbtBlockSizeBytesMin;
  let blockCount = Math.ceil(deviceSizeBytes / blockSizeBytes);
  while (blockCount > cbtBlockCountTarget && blockSizeBytes < cbtBlockSizeBytesMax) {
    blockSizeBytes *= 2;
    blockCount = Math.ceil(deviceSizeBytes / blockSizeBytes);
  }
  assert(blockSizeBytes >= cbtBlockSizeBytesMin && blockSizeBytes <= cbtBlockSizeBytesMax);
  return { blockSizeBytes, blockCount };
}

export function isValidCbtBlockSize(blockSizeBytes: number): boolean {
  return (
    Number.isSafeInteger(blockSizeBytes) &&
    blockSizeBytes >= cbtBlockSizeBytesOverrideMin &&
    blockSizeBytes <= cbtBlockSizeBytesMax &&
    (blockSizeBytes & (blockSizeBytes - 1)) === 0
  );
}

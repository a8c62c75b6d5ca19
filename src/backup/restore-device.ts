/**
 * Restore of one backup onto a BlockDevice (the daemon's restore into a blocksnap device: its origin, so
 * the writes go through change tracking and copy-before-write like any client's). The manifest's image
 * digest is checked from its chunk ids before anything is written (a manifest that does not hold together
 * writes nothing); every chunk is checked against its id as it is decoded, into a reused shared buffer. Chunks are read a bounded number
 * at a time (parallel: the store's hint, at least 4) and written in place; a zero chunk is written as
 * WRITE_ZEROES (the device may hold older data). A device larger than the backup keeps its bytes past the
 * backup's size. Then one flush.
 *
 * Cancel: `signal` stops it at the next chunk; what was written stays (the device holds part of the backup
 * over its old contents, which the error says). Not done: restore over NBD to another host's device.
 */
import type { BlockDevice } from "../block/device.js";
import { BlockError } from "../block/errors.js";
import { forEachBounded } from "./backup-run.js";
import { chunkLengthAt, type Manifest } from "./manifest.js";
import type { Repository } from "./repository.js";
import { checkImageDigest } from "./restore.js";

const chunksInFlightMin = 4;

export interface DeviceRestoreProgress {
  readonly totalBytes: number;
  readonly doneBytes: number;
}

export interface DeviceRestoreOutcome {
  readonly bytesWritten: number;
  readonly chunksRead: number;
}

export async function restoreToDevice(
  repository: Repository,
  manifest: Manifest,
  device: BlockDevice,
  options: {
    readonly signal?: AbortSignal;
    readonly onProgress?: (progress: DeviceRestoreProgress) => void;
  } = {},
): Promise<DeviceRestoreOutcome> {
  const name = `${manifest.device}/${manifest.id}`;
  if (device.sizeBytes < manifest.sizeBytes)
    throw new BlockError(
      "ENOSPC",
      `The device (${device.sizeBytes} bytes) is smaller than backup ${name} (${manifest.sizeBytes} bytes)`,
    );
  await checkImageDigest(repository, manifest);
  const totalBytes = manifest.sizeBytes;
  let doneBytes = 0;
  let chunksRead = 0;
  options.onProgress?.({ totalBytes, doneBytes });
  const indexes = manifest.chunks.map((_id, index) => index);
  const inFlight = Math.max(chunksInFlightMin, repository.store.inFlightHint ?? 0);
  const slots = repository.newChunkSlots();
  await forEachBounded(indexes, inFlight, async (index) => {
    if (options.signal?.aborted)
      throw new BlockError(
        "ECANCELED",
        `Restore of ${name} cancelled: the device holds part of it over its old contents`,
      );
    const id = manifest.chunks[index] ?? null;
    const lengthBytes = chunkLengthAt(manifest, index);
    const offsetBytes = index * manifest.chunkSizeBytes;
    if (id === null) {
      await device.writeZeroes(offsetBytes, lengthBytes);
    } else {
      const slot = slots.take();
      try {
        const plain = await repository.readChunkInto(id, slot);
        if (plain.byteLength !== lengthBytes)
          throw new BlockError(
            "EIO",
            `Chunk ${id} of backup ${name} holds ${plain.byteLength} bytes, not ${lengthBytes}`,
          );
        await device.write(offsetBytes, plain);
      } finally {
        slots.give(slot);
      }
      chunksRead += 1;
    }
    doneBytes += lengthBytes;
    options.onProgress?.({ totalBytes, doneBytes });
  });
  await device.flush();
  return { bytesWritten: doneBytes, chunksRead };
}

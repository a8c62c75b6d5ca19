/**
 * The engine's one home for checking what a caller passes in (library users and the daemon alike), so the
 * Engine's methods read as orchestration. Each check throws a BlockError EINVAL (or ENOSPC for a count)
 * whose message names the bad value; bounds come from engine-limits.ts. Checks that need the engine's
 * state (a name taken, a device busy) stay in the Engine.
 */
import { BlockError } from "../block/errors.js";
import { isValidCbtBlockSize } from "../cbt/cbt-geometry.js";
import {
  chunkSizeBytesDefault,
  chunkSizeBytesMax,
  chunkSizeBytesMin,
  isValidChunkSize,
} from "../cow/chunk-geometry.js";
import type { OnCowError } from "../cow/diff-area.js";
import { growthPortionBytesDefault } from "../storage/diff-storage.js";
import {
  deviceSizeBytesMin,
  freezeTimeoutMsDefault,
  freezeTimeoutMsMax,
  takeHookCommandCharsMax,
  waitTimeoutMsMax,
} from "./engine-limits.js";
import type { ByteRange, DeviceAddOptions, SnapshotCreateOptions, TakeOptions } from "./engine-types.js";

export function checkDeviceAddOptions(options: DeviceAddOptions): void {
  if (
    options.sizeBytes !== undefined &&
    (!Number.isSafeInteger(options.sizeBytes) || options.sizeBytes < deviceSizeBytesMin)
  ) {
    throw new BlockError(
      "EINVAL",
      `Invalid device size ${options.sizeBytes}: must be at least ${deviceSizeBytesMin} bytes`,
    );
  }
  if (options.cbtBlockSizeBytes !== undefined && !isValidCbtBlockSize(options.cbtBlockSizeBytes)) {
    throw new BlockError(
      "EINVAL",
      `Invalid CBT block size ${options.cbtBlockSizeBytes}: must be a power of two from 4 KiB to 64 MiB`,
    );
  }
  if (typeof options.backendPath !== "string" || options.backendPath === "") {
    throw new BlockError("EINVAL", "A backend path is required");
  }
}

/** A snapshot's parameters with their defaults filled in. */
export interface SnapshotParameters {
  readonly chunkSizeBytes: number;
  readonly growthPortionBytes: number;
  readonly onCowError: OnCowError;
  readonly deviceNames: readonly string[];
}

export function checkSnapshotCreateOptions(options: SnapshotCreateOptions): SnapshotParameters {
  const chunkSizeBytes = options.chunkSizeBytes ?? chunkSizeBytesDefault;
  if (!isValidChunkSize(chunkSizeBytes)) {
    throw new BlockError(
      "EINVAL",
      `Invalid chunk size ${chunkSizeBytes}: must be a power of two from ${chunkSizeBytesMin} to ${chunkSizeBytesMax}`,
    );
  }
  if (!Number.isSafeInteger(options.limitBytes) || options.limitBytes <= 0) {
    throw new BlockError(
      "EINVAL",
      `Invalid storage limit ${options.limitBytes}: must be a positive number of bytes`,
    );
  }
  // A take needs room for one chunk of each member; a smaller limit could only fail later (at take, ENOSPC).
  const deviceNames = options.devices ?? [];
  const limitBytesMin = chunkSizeBytes * Math.max(1, deviceNames.length);
  if (options.limitBytes < limitBytesMin) {
    throw new BlockError(
      "EINVAL",
      `Invalid storage limit ${options.limitBytes}: below one ${chunkSizeBytes}-byte chunk per device (at least ${limitBytesMin} bytes)`,
    );
  }
  const growthPortionBytes = options.growthPortionBytes ?? growthPortionBytesDefault;
  if (!Number.isSafeInteger(growthPortionBytes) || growthPortionBytes < chunkSizeBytes) {
    throw new BlockError(
      "EINVAL",
      `Invalid growth portion ${growthPortionBytes}: must be at least one chunk`,
    );
  }
  const onCowError = options.onCowError ?? "break-snapshot";
  if (onCowError !== "break-snapshot" && onCowError !== "fail-origin-write") {
    throw new BlockError("EINVAL", `Invalid copy-before-write error policy ${JSON.stringify(onCowError)}`);
  }
  if (typeof options.storage !== "string" || options.storage === "") {
    throw new BlockError("EINVAL", "A storage path is required");
  }
  for (const command of [options.preTakeCommand, options.postTakeCommand]) {
    if (
      command !== undefined &&
      (typeof command !== "string" || command.trim() === "" || command.length > takeHookCommandCharsMax)
    ) {
      throw new BlockError(
        "EINVAL",
        `A take hook must be a non-empty command of at most ${takeHookCommandCharsMax} characters`,
      );
    }
  }
  if (new Set(deviceNames).size !== deviceNames.length) {
    throw new BlockError("EINVAL", "A device is listed twice");
  }
  return { chunkSizeBytes, growthPortionBytes, onCowError, deviceNames };
}

/** The take's freeze timeout, default filled in. */
export function checkTakeOptions(options: TakeOptions): number {
  const freezeTimeoutMs = options.freezeTimeoutMs ?? freezeTimeoutMsDefault;
  if (
    !Number.isSafeInteger(freezeTimeoutMs) ||
    freezeTimeoutMs <= 0 ||
    freezeTimeoutMs > freezeTimeoutMsMax
  ) {
    throw new BlockError(
      "EINVAL",
      `Invalid freeze timeout ${freezeTimeoutMs}: must be 1 to ${freezeTimeoutMsMax} ms`,
    );
  }
  return freezeTimeoutMs;
}

export function checkWaitTimeout(timeoutMs: number): void {
  if (!Number.isSafeInteger(timeoutMs) || timeoutMs < 0 || timeoutMs > waitTimeoutMsMax) {
    throw new BlockError("EINVAL", `Invalid timeout ${timeoutMs}: must be 0 to ${waitTimeoutMsMax} ms`);
  }
}

export function checkRange(range: ByteRange, sizeBytes: number): void {
  const { offsetBytes, lengthBytes } = range;
  if (
    !Number.isSafeInteger(offsetBytes) ||
    offsetBytes < 0 ||
    !Number.isSafeInteger(lengthBytes) ||
    lengthBytes <= 0
  ) {
    throw new BlockError("EINVAL", `Invalid range ${offsetBytes}:${lengthBytes}`);
  }
  if (offsetBytes + lengthBytes > sizeBytes) {
    throw new BlockError(
      "EINVAL",
      `Range ${offsetBytes}:${lengthBytes} ends past the device size ${sizeBytes}`,
    );
  }
}

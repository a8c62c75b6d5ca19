/** Validation of user-chosen names and ids (ARCHITECTURE §3). */
import { BlockError } from "../block/errors.js";

const deviceNamePattern = /^[A-Za-z0-9._-]{1,64}$/;
const snapshotIdPattern = /^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$/;

export function checkDeviceName(name: unknown): asserts name is string {
  if (typeof name !== "string" || !deviceNamePattern.test(name) || name === "." || name === "..") {
    throw new BlockError(
      "EINVAL",
      `Invalid device name ${JSON.stringify(name)}: use 1 to 64 of A-Z a-z 0-9 . _ - (not "." or "..")`,
    );
  }
}

export function isSnapshotId(id: string): boolean {
  return snapshotIdPattern.test(id);
}

/** Export name of a snapshot image. */
export function imageExportName(deviceName: string, snapshotId: string): string {
  return `${deviceName}@${snapshotId}`;
}

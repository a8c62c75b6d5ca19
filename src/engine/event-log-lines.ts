/**
 * One log line per snapshot event, so that a snapshot that breaks is in the daemon's log even when no
 * client watches: `corrupted` at error level (the images fail from now on), `low_space` at warn (act before
 * it fills), the others at info (they come with their own consequences: a corruption, an io_error's retry).
 */
import type { Logger } from "../util/logger.js";
import type { SnapshotEvent } from "./engine-types.js";

export function logSnapshotEvent(
  logger: Logger,
  snapshotId: string,
  seq: number,
  event: SnapshotEvent,
): void {
  const fields = { snapshot: snapshotId, seq, ...event };
  switch (event.type) {
    case "corrupted":
      logger.error(fields, `snapshot corrupted: device ${event.device} (${event.errno})`);
      return;
    case "low_space":
      logger.warn(fields, "snapshot storage low on space");
      return;
    case "no_space":
      logger.info(fields, "snapshot storage full (no_space)");
      return;
    case "io_error":
      logger.info(fields, `snapshot storage I/O error (${event.errno})`);
      return;
  }
}

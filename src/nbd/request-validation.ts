/**
 * Validation of one transmission request against its session, before anything touches a device (nbdkit's
 * validate_request()). Pure: no I/O, no state. The order of checks follows nbdkit: unknown command, flags
 * (unknown, on the wrong command, or not advertised), DISC/FLUSH arguments, read-only, command not
 * advertised, length, range.
 *
 * Offsets are u64 on the wire. They arrive here as two u32 halves and are checked exactly, without BigInt
 * on the hot path: any offset at or above 2^53 (high half >= 2^21) is past the end of every device
 * (device sizes are safe integers), and below that `high * 2^32 + low` is exact. The sum with a u32 length
 * then stays below 2^53 + 2^32, where a comparison with a safe-integer size cannot go wrong. So offset 2^63
 * is an ordinary EINVAL, never a RangeError from fs (docs/design/nbd-notes.md).
 *
 * Returns the errno to answer, or undefined when the request may run; errno-map.ts turns it into NBD.
 */
import type { Errno } from "../block/errors.js";
import {
  NBD_CMD_BLOCK_STATUS,
  NBD_CMD_DISC,
  NBD_CMD_FLAG_DF,
  NBD_CMD_FLAG_FAST_ZERO,
  NBD_CMD_FLAG_FUA,
  NBD_CMD_FLAG_NO_HOLE,
  NBD_CMD_FLAG_REQ_ONE,
  NBD_CMD_FLUSH,
  NBD_CMD_READ,
  NBD_CMD_TRIM,
  NBD_CMD_WRITE,
  NBD_CMD_WRITE_ZEROES,
  NBD_FLAG_SEND_DF,
  NBD_FLAG_SEND_FAST_ZERO,
  NBD_FLAG_SEND_FUA,
  NBD_FLAG_SEND_TRIM,
  NBD_FLAG_SEND_WRITE_ZEROES,
} from "./nbd-protocol.js";
import type { NbdSession } from "./nbd-session.js";

const knownCommandFlags =
  NBD_CMD_FLAG_FUA | NBD_CMD_FLAG_NO_HOLE | NBD_CMD_FLAG_DF | NBD_CMD_FLAG_REQ_ONE | NBD_CMD_FLAG_FAST_ZERO;
/** High u32 half of the smallest offset that no device can reach (2^53). */
const offsetHighUnreachable = 2 ** 21;
const twoPow32 = 2 ** 32;

/** The offset as a Number when it is below 2^53, else -1 (no device reaches it). */
export function offsetBytesOf(offsetHigh: number, offsetLow: number): number {
  if (offsetHigh >= offsetHighUnreachable) return -1;
  return offsetHigh * twoPow32 + offsetLow;
}

export function validateRequest(
  session: NbdSession,
  command: number,
  commandFlags: number,
  offsetHigh: number,
  offsetLow: number,
  lengthBytes: number,
): Errno | undefined {
  if (command > NBD_CMD_BLOCK_STATUS) return "EINVAL";
  if ((commandFlags & ~knownCommandFlags) !== 0) return "EINVAL";
  const flags = session.transmissionFlags;
  if ((commandFlags & NBD_CMD_FLAG_FUA) !== 0 && (flags & NBD_FLAG_SEND_FUA) === 0) return "EINVAL";
  if ((commandFlags & NBD_CMD_FLAG_NO_HOLE) !== 0 && command !== NBD_CMD_WRITE_ZEROES) return "EINVAL";
  if ((commandFlags & NBD_CMD_FLAG_FAST_ZERO) !== 0) {
    if (command !== NBD_CMD_WRITE_ZEROES || (flags & NBD_FLAG_SEND_FAST_ZERO) === 0) return "EINVAL";
  }
  if ((commandFlags & NBD_CMD_FLAG_DF) !== 0) {
    if (command !== NBD_CMD_READ || (flags & NBD_FLAG_SEND_DF) === 0) return "EINVAL";
  }
  if ((commandFlags & NBD_CMD_FLAG_REQ_ONE) !== 0 && command !== NBD_CMD_BLOCK_STATUS) return "EINVAL";

  if (command === NBD_CMD_DISC || command === NBD_CMD_FLUSH) {
    return offsetHigh === 0 && offsetLow === 0 && lengthBytes === 0 ? undefined : "EINVAL";
  }
  const isModification =
    command === NBD_CMD_WRITE || command === NBD_CMD_TRIM || command === NBD_CMD_WRITE_ZEROES;
  if (isModification && session.isReadOnly) return "EPERM";
  if (command === NBD_CMD_TRIM && (flags & NBD_FLAG_SEND_TRIM) === 0) return "EINVAL";
  if (command === NBD_CMD_WRITE_ZEROES && (flags & NBD_FLAG_SEND_WRITE_ZEROES) === 0) return "EINVAL";
  if (command === NBD_CMD_BLOCK_STATUS) {
    const hasContext = session.baseAllocationContextId !== 0 || session.metaContexts.length > 0;
    if (!session.structuredReplies || !hasContext) return "EINVAL";
  }

  // Every remaining command addresses a range: READ, WRITE, TRIM, CACHE, WRITE_ZEROES, BLOCK_STATUS.
  if (lengthBytes === 0) return "EINVAL";
  if (
    (command === NBD_CMD_READ || command === NBD_CMD_WRITE) &&
    lengthBytes > session.requestLengthBytesMax
  ) {
    return "EINVAL";
  }
  const pastEnd: Errno = command === NBD_CMD_WRITE || command === NBD_CMD_WRITE_ZEROES ? "ENOSPC" : "EINVAL";
  const offsetBytes = offsetBytesOf(offsetHigh, offsetLow);
  if (offsetBytes < 0 || offsetBytes + lengthBytes > session.sizeBytes) return pastEnd;
  return undefined;
}

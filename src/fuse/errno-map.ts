/**
 * Errno → FUSE reply error, in exactly one function (docs/design/architecture.md). A FUSE reply carries a negative
 * Linux errno in fuse_out_header.error; the kernel rejects the whole reply unless -512 < error <= 0.
 *
 * Two rules beyond the plain number:
 * - ENOSYS from a device becomes EIO: to the kernel ENOSYS means "this opcode is not implemented" and it
 *   would stop sending FSYNC or FALLOCATE for the rest of the mount. Unimplemented opcodes use
 *   FUSE_ERROR_NOT_IMPLEMENTED instead.
 * - Anything that is not a BlockError is an I/O error to the client (toBlockError's rule), except a broken
 *   invariant: assertion failures are rethrown so the daemon crashes rather than serve wrong data.
 */
import { AssertionError } from "node:assert";
import { constants } from "node:os";
import { type Errno, errnoNumber, toBlockError } from "../block/errors.js";

const linuxErrnoMax = 511;

/** The reply error for an opcode we do not implement: the kernel then stops sending it. */
export const FUSE_ERROR_NOT_IMPLEMENTED = -constants.errno.ENOSYS;

export function fuseErrorOf(error: unknown): number {
  if (error instanceof AssertionError) throw error;
  const errno: Errno = toBlockError(error, "fuse").errno;
  const value = errno === "ENOSYS" ? constants.errno.EIO : errnoNumber(errno);
  if (!Number.isInteger(value) || value <= 0 || value > linuxErrnoMax) return -constants.errno.EIO;
  return -value;
}

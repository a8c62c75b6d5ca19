/**
 * The only errno → NBD error mapping of the project (nbdkit's nbd_errno(), docs/design/errors.md). It takes
 * the request's command flags because two errors exist on the wire only for one flag each: ENOTSUP answers
 * a FAST_ZERO, EOVERFLOW answers a DF read. Everything unnamed is EINVAL, as in nbdkit.
 *
 * errnoOfThrown() turns whatever a device threw into an errno: a BlockError carries its own; a broken
 * invariant (AssertionError) is answered EIO and then ends the daemon (util/broken-invariant.ts); anything
 * else is a bug below us, logged by the caller and answered EIO.
 */
import type { Errno } from "../block/errors.js";
import { BlockError } from "../block/errors.js";
import { isBrokenInvariant } from "../util/broken-invariant.js";
import {
  NBD_CMD_FLAG_DF,
  NBD_CMD_FLAG_FAST_ZERO,
  NBD_EINVAL,
  NBD_EIO,
  NBD_ENOMEM,
  NBD_ENOSPC,
  NBD_ENOTSUP,
  NBD_EOVERFLOW,
  NBD_EPERM,
  NBD_ESHUTDOWN,
} from "./nbd-protocol.js";

export function nbdErrorOfErrno(errno: Errno, commandFlags: number): number {
  switch (errno) {
    case "EPERM":
    case "EROFS":
      return NBD_EPERM;
    case "ENOSPC":
    case "EFBIG":
    case "EDQUOT":
      return NBD_ENOSPC;
    case "EIO":
      return NBD_EIO;
    case "ENOMEM":
      return NBD_ENOMEM;
    case "ESHUTDOWN":
      return NBD_ESHUTDOWN;
    case "ENOTSUP":
      return (commandFlags & NBD_CMD_FLAG_FAST_ZERO) !== 0 ? NBD_ENOTSUP : NBD_EINVAL;
    case "EOVERFLOW":
      return (commandFlags & NBD_CMD_FLAG_DF) !== 0 ? NBD_EOVERFLOW : NBD_EINVAL;
    default:
      return NBD_EINVAL;
  }
}

/** What a thrown value is to the NBD face: an operating error, a broken invariant, or another bug. */
export type ThrownKind = "block-error" | "broken-invariant" | "bug";

/** The errno of a thrown value and its kind: the caller logs bugs and crashes on broken invariants. */
export function errnoOfThrown(error: unknown): { readonly errno: Errno; readonly kind: ThrownKind } {
  if (error instanceof BlockError) return { errno: error.errno, kind: "block-error" };
  if (isBrokenInvariant(error)) return { errno: "EIO", kind: "broken-invariant" };
  return { errno: "EIO", kind: "bug" };
}

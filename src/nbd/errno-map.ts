/**
 * The only errno → NBD error mapping of the project (nbdkit's nbd_errno(), style-models.md §6.4). It takes
 * the request's command flags because two errors exist on the wire only for one flag each: ENOTSUP answers
 * a FAST_ZERO, EOVERFLOW answers a DF read. Everything unnamed is EINVAL, as in nbdkit.
 *
 * errnoOfThrown() turns whatever a device threw into an errno: a BlockError carries its own; anything else
 * is a bug below us, logged by the caller and answered EIO, so one broken request never takes the daemon
 * down.
 */
import type { Errno } from "../block/errors.js";
import { BlockError } from "../block/errors.js";
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

/** The errno of a thrown value, and whether it was a bug (not a BlockError) that the caller must log. */
export function errnoOfThrown(error: unknown): { readonly errno: Errno; readonly isBug: boolean } {
  if (error instanceof BlockError) return { errno: error.errno, isBug: false };
  return { errno: "EIO", isBug: true };
}

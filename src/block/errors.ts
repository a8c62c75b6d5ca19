/**
 * Operating errors of the data and control paths. Every failure a client may see carries an errno name;
 * the faces map it to their protocol in exactly one function each (nbd/errno-map.ts, fuse/errno-map.ts).
 */
import { constants } from "node:os";
import { rethrowBrokenInvariant } from "../util/broken-invariant.js";

export const errnoNames = [
  "EPERM",
  "ENOENT",
  "ESRCH",
  "EINTR",
  "EIO",
  "EAGAIN",
  "ENOMEM",
  "EACCES",
  "EFAULT",
  "EBUSY",
  "EEXIST",
  "ENODEV",
  "ENOTDIR",
  "EISDIR",
  "EINVAL",
  "EFBIG",
  "ENOSPC",
  "EROFS",
  "ENOSYS",
  "ENODATA",
  "EOVERFLOW",
  "ENOTSUP",
  "ESHUTDOWN",
  "ETIMEDOUT",
  "EALREADY",
  "ECANCELED",
  "EDQUOT",
] as const;

export type Errno = (typeof errnoNames)[number];

const errnoNameSet: ReadonlySet<string> = new Set(errnoNames);

export function isErrno(name: string): name is Errno {
  return errnoNameSet.has(name);
}

export class BlockError extends Error {
  readonly errno: Errno;

  constructor(errno: Errno, message: string, options?: ErrorOptions) {
    super(message, options);
    this.name = "BlockError";
    this.errno = errno;
  }

  /** The numeric Linux errno value, e.g. 5 for EIO. */
  get errnoNumber(): number {
    return errnoNumber(this.errno);
  }
}

export function errnoNumber(errno: Errno): number {
  const value = (constants.errno as Record<string, number | undefined>)[errno];
  if (value !== undefined) return value;
  // ENOTSUP is an alias of EOPNOTSUPP on Linux and absent from Node's table.
  if (errno === "ENOTSUP") return constants.errno.EOPNOTSUPP;
  return constants.errno.EIO;
}

/**
 * Converts a Node.js system error (err.code = "ENOSPC" ...) into a BlockError. Anything without a known
 * errno becomes EIO: a failure we cannot name is an I/O error to the client. A broken invariant
 * (AssertionError) is not an operating error: it is rethrown, never turned into an errno.
 */
export function toBlockError(error: unknown, context: string): BlockError {
  if (error instanceof BlockError) return error;
  rethrowBrokenInvariant(error);
  const code = (error as { code?: unknown } | null)?.code;
  const errno: Errno = typeof code === "string" && isErrno(code) ? code : "EIO";
  const detail = error instanceof Error ? error.message : String(error);
  return new BlockError(errno, `${context}: ${detail}`, { cause: error });
}

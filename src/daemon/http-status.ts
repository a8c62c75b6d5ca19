/**
 * The one mapping from an errno name to the control API's HTTP status (docs/api.md, "Errors").
 * Unknown names and real I/O failures are 500: the request was fine, the daemon could not do it.
 */
export function httpStatusForErrno(errno: string): number {
  switch (errno) {
    case "EINVAL":
    case "ENOTDIR":
    case "EISDIR":
    // A size the file system cannot hold (a growth portion of 2^50) is a bad argument. Only a request body
    // over the limit is 413, and control-server.ts answers that one itself.
    case "EFBIG":
      return 400;
    case "EPERM":
    case "EACCES":
    case "EROFS":
      return 403;
    case "ENOENT":
    case "ESRCH":
      return 404;
    case "ENOTSUP":
      return 405;
    case "EEXIST":
    case "EBUSY":
    case "EALREADY":
    case "ENODEV":
      return 409;
    case "ESHUTDOWN":
    case "EAGAIN":
      return 503;
    case "ETIMEDOUT":
      return 504;
    case "ENOSPC":
    case "EDQUOT":
    // A memory: device larger than the host's RAM allows.
    case "ENOMEM":
      return 507;
    default:
      return 500;
  }
}

/**
 * Clears the way for a Unix socket listener: only a stale socket (lstat says socket, and connect(2) says
 * ECONNREFUSED: nothing listens) is removed. A live socket is EBUSY; anything else at the path (a regular
 * file someone named with `--socket`, a directory, a symlink) is EEXIST and stays untouched; a socket we
 * cannot probe (EACCES) is refused with that errno rather than guessed at.
 */
import { lstat, unlink } from "node:fs/promises";
import { connect } from "node:net";
import { BlockError, isErrno, toBlockError } from "../block/errors.js";

export async function removeStaleSocket(socketPath: string): Promise<void> {
  let stat: Awaited<ReturnType<typeof lstat>>;
  try {
    stat = await lstat(socketPath);
  } catch (error) {
    if ((error as NodeJS.ErrnoException).code === "ENOENT") return;
    throw toBlockError(error, `Cannot inspect ${socketPath}`);
  }
  if (!stat.isSocket()) {
    throw new BlockError("EEXIST", `${socketPath} exists and is not a socket: refusing to replace it`);
  }
  const connectCode = await probeConnect(socketPath);
  if (connectCode === null) {
    throw new BlockError("EBUSY", `something is already listening on ${socketPath}`);
  }
  if (connectCode !== "ECONNREFUSED") {
    const errno = isErrno(connectCode) ? connectCode : "EIO";
    throw new BlockError(
      errno,
      `cannot tell whether ${socketPath} is in use (${connectCode}): not replacing it`,
    );
  }
  try {
    await unlink(socketPath);
  } catch (error) {
    if ((error as NodeJS.ErrnoException).code !== "ENOENT")
      throw toBlockError(error, `Cannot remove ${socketPath}`);
  }
}

/** null when something accepted the connection, else the connect error's code. */
function probeConnect(socketPath: string): Promise<string | null> {
  return new Promise((resolve) => {
    const socket = connect(socketPath);
    socket.once("connect", () => {
      socket.destroy();
      resolve(null);
    });
    socket.once("error", (error: NodeJS.ErrnoException) => resolve(error.code ?? "EIO"));
  });
}

/**
 * One rule for a broken invariant (an AssertionError), wherever it surfaces — an NBD or FUSE request, a
 * control request, a mark in the CBT: log it at error level with its stack, answer the request in hand
 * with EIO where there is one, then end the process with process.abort() (SIGABRT; a core dump where the
 * system keeps them) once the current tick's replies have left. Abort, not a rethrow: an uncaught exception
 * makes Node join its worker threads before exiting, and the FUSE reader thread sits in a blocking read of
 * /dev/fuse that only an unmount ends, so a rethrow left the daemon hanging half-dead. The stack also goes
 * straight to stderr, so a library user with a silent logger still sees why. A daemon whose invariants
 * broke may hold a wrong chunk map: it must not serve on (TigerBeetle's rule); its supervisor restarts it
 * and the durable state decides what survives (docs/design/errors.md).
 *
 * Operating errors are BlockErrors and never come here; bugs that are not assertions (a TypeError) stay
 * EIO answers with an error log, as before.
 */
import { AssertionError } from "node:assert";
import { writeSync } from "node:fs";
import type { Logger } from "./logger.js";

export function isBrokenInvariant(error: unknown): error is AssertionError {
  return error instanceof AssertionError;
}

/** Rethrows a broken invariant at once: for catches that turn everything else into an operating error. */
export function rethrowBrokenInvariant(error: unknown): void {
  if (error instanceof AssertionError) throw error;
}

/**
 * Logs `error` and schedules the end of the process. Returns, so that the caller can still send its EIO
 * answer: the abort comes after the current tick's replies were written to their sockets.
 */
export function crashOnBrokenInvariant(
  error: Error,
  logger: Logger,
  fields: Readonly<Record<string, unknown>>,
  where: string,
  outcome = "answered EIO",
): void {
  logger.error(
    { ...fields, err: error.message, stack: error.stack },
    `broken invariant in ${where}: ${outcome}, the daemon stops`,
  );
  try {
    writeSync(2, `blocksnap: broken invariant in ${where}; aborting\n${error.stack ?? error.message}\n`);
  } catch {
    // stderr is gone: the log line above is all there is.
  }
  setImmediate(() => process.abort());
}

/**
 * The CLI's failures and their exit codes, in one table: 1 for a command that could not be done (the
 * daemon said no, or cannot be reached), 2 for a command line that makes no sense (unknown command or
 * option, missing argument, bad size or range). Messages are printed as `blocksnap: <message>`.
 */
export const exitCodeFailure = 1;
export const exitCodeUsage = 2;

export class CliError extends Error {
  readonly exitCode: number;
  /** The errno name from the daemon, when there is one. */
  readonly errno: string | null;

  constructor(message: string, options: { exitCode?: number; errno?: string | null; cause?: unknown } = {}) {
    super(message, { cause: options.cause });
    this.name = "CliError";
    this.exitCode = options.exitCode ?? exitCodeFailure;
    this.errno = options.errno ?? null;
  }
}

/**
 * What every client command shares: the options `--json`, `--socket PATH` and `--state-dir DIR`, the
 * socket resolution (`--socket`, else BLOCKSNAP_SOCKET, else `<state dir>/blocksnap.sock` with the
 * daemon's own state-dir rules), and the error report (`blocksnap: <message>` on stderr; with `--json`
 * also `{ "error": { "errno", "message" } }` on stdout) with the exit code of cli-error.ts.
 */
import { resolve } from "node:path";
import type { Command } from "commander";
import { BlockError } from "../block/errors.js";
import { controlSocketPathIn, currentStateDirEnvironment, resolveStateDir } from "../daemon/paths.js";
import { CliError } from "./cli-error.js";
import { ControlClient } from "./control-client.js";
import { writeJson, writeJsonLine } from "./output.js";

export interface CommonOptions {
  readonly json?: boolean;
  readonly socket?: string;
  readonly stateDir?: string;
}

export interface CommandContext {
  readonly client: ControlClient;
  readonly json: boolean;
}

export function addCommonOptions(command: Command): Command {
  return command
    .option("--json", "print the result as JSON (the API response body; see docs/api.md)")
    .option(
      "--socket <path>",
      "the daemon's control socket (default: $BLOCKSNAP_SOCKET or <state dir>/blocksnap.sock)",
    )
    .option(
      "--state-dir <dir>",
      "the daemon's state directory (default: $BLOCKSNAP_STATE_DIR or the system default)",
    );
}

export function resolveControlSocket(options: CommonOptions): string {
  if (options.socket !== undefined && options.socket !== "") return options.socket;
  const fromEnv = process.env.BLOCKSNAP_SOCKET;
  if (fromEnv !== undefined && fromEnv !== "") return fromEnv;
  return controlSocketPathIn(resolveStateDir(options.stateDir, currentStateDirEnvironment()));
}

/** Paths go to the daemon, whose working directory is not ours: make them absolute. */
export function absolutePath(path: string): string {
  return path === "memory:" ? path : resolve(path);
}

/**
 * Wraps a command body as a commander action: builds the context from the command's options and turns
 * any failure into the error report and exit code.
 */
export function clientAction<Options extends CommonOptions>(
  body: (context: CommandContext, args: string[], options: Options) => Promise<void>,
): (...actionArgs: unknown[]) => Promise<void> {
  return localAction<Options>((args, options) =>
    body(
      {
        client: new ControlClient({ socketPath: resolveControlSocket(options) }),
        json: options.json === true,
      },
      args,
      options,
    ),
  );
}

/**
 * Wraps a command body that needs no daemon (it works on local files) as a commander action: the
 * positional arguments (variadic ones flattened) and the options, and any failure reported.
 */
export function localAction<Options extends CommonOptions>(
  body: (args: string[], options: Options) => Promise<void>,
): (...actionArgs: unknown[]) => Promise<void> {
  return async (...actionArgs: unknown[]) => {
    const command = actionArgs[actionArgs.length - 1] as Command;
    const options = command.opts<Options>();
    const args = actionArgs
      .slice(0, -2)
      .flatMap((value) => (Array.isArray(value) ? value : [value])) as string[];
    try {
      await body(args, options);
    } catch (error) {
      reportError(error, options.json === true);
    }
  };
}

/** `json`: also the error object on stdout, pretty-printed, or as one line ("line": `serve --json`'s JSON lines). */
export function reportError(error: unknown, json: boolean | "line"): void {
  const cliError =
    error instanceof CliError
      ? error
      : new CliError(error instanceof Error ? error.message : String(error), {
          errno: errnoOf(error),
          cause: error,
        });
  const errno = cliError.errno ?? "EIO";
  process.stderr.write(
    `blocksnap: ${cliError.message}${cliError.errno === null ? "" : ` (${cliError.errno})`}\n`,
  );
  if (json === "line") writeJsonLine({ error: { errno, message: cliError.message } });
  else if (json) writeJson({ error: { errno, message: cliError.message } });
  process.exitCode = cliError.exitCode;
}

/**
 * The real errno of a failure that did not come from the daemon (a start failure of `serve`): a
 * BlockError's errno, or a Node system error's code (EADDRINUSE, EBUSY). An EIO that wraps a system error
 * (toBlockError turns codes it has no name for into EIO) reports the wrapped code; EIO only when there is none.
 */
function errnoOf(error: unknown): string {
  const systemCode = (value: unknown): string | null => {
    const code = (value as { code?: unknown } | null)?.code;
    return typeof code === "string" && /^E[A-Z0-9]+$/.test(code) ? code : null;
  };
  if (error instanceof BlockError && error.errno !== "EIO") return error.errno;
  let current: unknown = error;
  for (let depth = 0; depth < 8 && current !== undefined && current !== null; depth++) {
    const code = systemCode(current);
    if (code !== null) return code;
    current = (current as { cause?: unknown }).cause;
  }
  return "EIO";
}

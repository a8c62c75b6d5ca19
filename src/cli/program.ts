/**
 * The `blocksnap` command line (commander 14): the program, its groups and commands, and the mapping of
 * commander's own failures to exit codes. Usage errors (unknown command or option, missing argument, bad
 * size or range) print `blocksnap: <message>` and exit 2 (with `--json`, also `{"error": {"errno": "EINVAL",
 * …}}` on stdout); `--help` exits 0.
 */
import { Command, CommanderError } from "commander";
import { addAccessCommands } from "./access-commands.js";
import { addBackupCommands } from "./backup-commands.js";
import { addCbtCommands } from "./cbt-commands.js";
import { exitCodeUsage } from "./cli-error.js";
import { addCompletionCommands, answerCompletion } from "./completion-command.js";
import { addDeviceCommands } from "./device-commands.js";
import { addInstallUnitsCommand } from "./install-units-command.js";
import { addLogLevelCommand } from "./log-level-command.js";
import { addManCommand } from "./man-command.js";
import { writeJson } from "./output.js";
import { addServeCommand } from "./serve-command.js";
import { addSnapshotCommands } from "./snapshot-commands.js";
import { addStatusCommands } from "./status-commands.js";
import { packageVersion } from "./version.js";

export function buildProgram(): Command {
  const program = new Command("blocksnap")
    .description("Snapshots of live block devices in userspace: copy-before-write, CBT, NBD and FUSE")
    .version(packageVersion(), "-V, --version")
    .exitOverride()
    .showHelpAfterError("(add --help for usage)")
    .configureOutput({
      outputError: (text, write) => write(`blocksnap: ${text.replace(/^error: /, "")}`),
    })
    .addHelpText(
      "after",
      "\nExample:\n  $ blocksnap serve &\n  $ blocksnap device add disk0 --backend /var/lib/images/disk0.img --size 10G\n",
    );
  addServeCommand(program);
  addStatusCommands(program);
  addLogLevelCommand(program);
  addDeviceCommands(program);
  addCbtCommands(program);
  addSnapshotCommands(program);
  addBackupCommands(program);
  addAccessCommands(program);
  addInstallUnitsCommand(program);
  addManCommand(program);
  addCompletionCommands(program);
  return program;
}

/** Exit code for an error thrown by commander under exitOverride. */
export function exitCodeForCommanderError(error: CommanderError): number {
  if (error.code === "commander.helpDisplayed" || error.code === "commander.version") return 0;
  return error.exitCode === 0 ? 0 : exitCodeUsage;
}

/** `--json` among the arguments, before a `--` that ends the options. */
function asksForJson(args: readonly string[]): boolean {
  const end = args.indexOf("--");
  return (end === -1 ? args : args.slice(0, end)).includes("--json");
}

export async function runCli(argv: readonly string[]): Promise<void> {
  // `blocksnap status | head`: a reader that goes away is not an error worth a stack trace.
  process.stdout.on("error", (error: NodeJS.ErrnoException) => {
    if (error.code !== "EPIPE") throw error;
    process.exit(0);
  });
  const program = buildProgram();
  if (argv[2] === "__complete") return await answerCompletion(program, argv.slice(3));
  try {
    await program.parseAsync([...argv]);
  } catch (error) {
    if (error instanceof CommanderError) {
      process.exitCode = exitCodeForCommanderError(error);
      // Under --json a usage error is an error object on stdout too, as the daemon's refusals are.
      if (process.exitCode === exitCodeUsage && asksForJson(argv.slice(2))) {
        writeJson({ error: { errno: "EINVAL", message: error.message.replace(/^error: /, "") } });
      }
      return;
    }
    throw error;
  }
}

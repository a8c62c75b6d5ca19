/**
 * `blocksnap install-units`: writes blocksnap.service and blocksnap.socket for this installation (the node
 * binary and CLI script running now) into a systemd unit directory, default /etc/systemd/system, and
 * prints the commands that enable them. It never runs systemctl itself: enabling a storage daemon is the
 * admin's decision. `--print` writes the service unit to stdout instead.
 */
import { writeFile } from "node:fs/promises";
import { join } from "node:path";
import { fileURLToPath } from "node:url";
import type { Command } from "commander";
import {
  renderServiceUnit,
  renderSocketUnit,
  serviceUnitName,
  socketUnitName,
} from "../daemon/systemd-units.js";
import { CliError } from "./cli-error.js";
import { reportError } from "./command-context.js";
import { writeJson, writeLine } from "./output.js";
import { parseStopWait, stopWaitSecondsDefault } from "./serve-command.js";

interface InstallUnitsOptions {
  readonly dir: string;
  readonly print?: boolean;
  readonly stopWait: number;
  readonly json?: boolean;
}

export function addInstallUnitsCommand(program: Command): void {
  program
    .command("install-units")
    .description("write systemd units (blocksnap.service, blocksnap.socket) for this installation")
    .option("--dir <dir>", "unit directory", "/etc/systemd/system")
    .option(
      "--stop-wait <seconds>",
      "how long a stop waits for file systems mounted on blocksnap's devices",
      parseStopWait,
      stopWaitSecondsDefault,
    )
    .option("--print", "print the service unit on stdout instead of writing files")
    .option("--json", "print the written paths as JSON")
    .addHelpText(
      "after",
      "\nExample:\n  $ sudo blocksnap install-units && sudo systemctl daemon-reload && sudo systemctl enable --now blocksnap.service\n",
    )
    .action(async (options: InstallUnitsOptions) => {
      const cliPath = fileURLToPath(new URL("./main.js", import.meta.url));
      const service = renderServiceUnit({
        nodePath: process.execPath,
        cliPath,
        serveArgs: ["--stop-wait", String(options.stopWait)],
        stopWaitSeconds: options.stopWait,
      });
      if (options.print === true) {
        process.stdout.write(service);
        return;
      }
      const written = [join(options.dir, serviceUnitName), join(options.dir, socketUnitName)];
      try {
        await writeFile(written[0]!, service, { mode: 0o644 });
        await writeFile(written[1]!, renderSocketUnit(), { mode: 0o644 });
      } catch (error) {
        const code = (error as NodeJS.ErrnoException).code ?? "EIO";
        reportError(
          new CliError(`cannot write units into ${options.dir}: ${(error as Error).message}`, {
            errno: code,
          }),
          options.json === true,
        );
        return;
      }
      if (options.json === true) return writeJson({ written });
      for (const path of written) writeLine(`wrote ${path}`);
      writeLine("then: systemctl daemon-reload && systemctl enable --now blocksnap.service");
    });
}

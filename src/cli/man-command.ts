/**
 * `blocksnap man [PAGE]` prints a man page rendered from this program (man-pages.ts); `--install DIR`
 * writes every page as DIR/<page>.8 (e.g. /usr/local/share/man/man8, then `man blocksnap-snapshot`).
 */
import type { Command } from "commander";
import { CliError, exitCodeUsage } from "./cli-error.js";
import { reportError } from "./command-context.js";
import { installManPages, renderManPages } from "./man-pages.js";
import { writeJson, writeLine } from "./output.js";
import { packageVersion } from "./version.js";

interface ManOptions {
  readonly install?: string;
  readonly json?: boolean;
}

export function addManCommand(program: Command): void {
  program
    .command("man")
    .description("print a man page (blocksnap, blocksnap-device, …) or install them all")
    .argument("[page]", "page name: blocksnap or blocksnap-<group>", program.name())
    .option("--install <dir>", "write every page into DIR as <page>.8 instead of printing")
    .option("--json", "with --install: print the written paths as JSON")
    .addHelpText(
      "after",
      "\nExamples:\n  $ blocksnap man blocksnap-snapshot | man -l -\n  $ sudo blocksnap man --install /usr/local/share/man/man8\n",
    )
    .action(async (pageName: string, options: ManOptions) => {
      const json = options.json === true;
      const pages = renderManPages(program, packageVersion());
      try {
        if (options.install !== undefined) {
          const written = await installManPages(pages, options.install);
          if (json) return writeJson({ written });
          for (const path of written) writeLine(`wrote ${path}`);
          return;
        }
        const found = pages.find((candidate) => candidate.name === pageName);
        if (found === undefined) {
          throw new CliError(
            `no man page ${JSON.stringify(pageName)}; pages: ${pages.map((candidate) => candidate.name).join(", ")}`,
            { exitCode: exitCodeUsage, errno: "ENOENT" },
          );
        }
        process.stdout.write(found.roff);
      } catch (error) {
        reportError(
          error instanceof CliError
            ? error
            : new CliError((error as Error).message, {
                errno: (error as NodeJS.ErrnoException).code ?? "EIO",
              }),
          json,
        );
      }
    });
}

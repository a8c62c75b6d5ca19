/**
 * `blocksnap log-level [LEVEL]`: shows or changes the running daemon's log level (GET / POST
 * /v1/log-level), without a restart or a signal. The change lasts until the daemon stops; under
 * `serve --supervise` it is the engine's, and an engine restarted by the supervisor starts again at
 * `serve --log-level`.
 */
import type { Command } from "commander";
import { Argument } from "commander";
import type { LogLevelView } from "../daemon/api-types.js";
import { logLevelNames } from "../util/logger.js";
import { addCommonOptions, type CommonOptions, clientAction } from "./command-context.js";
import { writeJson, writeLine } from "./output.js";

export function addLogLevelCommand(program: Command): void {
  addCommonOptions(
    program
      .command("log-level")
      .description("show or change the running daemon's log level")
      .addArgument(new Argument("[level]", "the new level").choices(logLevelNames)),
  )
    .addHelpText("after", "\nExamples:\n  $ blocksnap log-level debug\n  $ blocksnap log-level\n")
    .action(
      clientAction<CommonOptions>(async ({ client, json }, [level]) => {
        if (level === undefined) {
          const view = await client.get<LogLevelView>("/v1/log-level");
          if (json) return writeJson(view);
          return writeLine(view.level);
        }
        const view = await client.post<LogLevelView>("/v1/log-level", { level });
        if (json) return writeJson(view);
        writeLine(`log level ${view.previous} → ${view.level}`);
      }),
    );
}

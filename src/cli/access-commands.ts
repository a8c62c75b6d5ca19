/**
 * `blocksnap access show|reload`: the NBD access rules of the running daemon (serve --access FILE; the
 * format is in src/nbd/access-rules.ts and docs/cli.md). `reload` rereads the file like SIGHUP does, and
 * a bad file is the daemon's one-line error with the rules in force unchanged.
 */
import type { Command } from "commander";
import type { AccessRulesView } from "../daemon/api-types.js";
import { addCommonOptions, type CommonOptions, clientAction } from "./command-context.js";
import { formatFields, formatTable, writeJson, writeLine } from "./output.js";

export function accessRulesLines(view: AccessRulesView): string[] {
  if (view.file === null || view.rules === null) {
    return ["no access file (serve --access): every client that gets in may use every export"];
  }
  const lines = formatFields([
    ["file", view.file],
    ["loaded", view.loadedAt ?? "-"],
    ["rules", `${view.rules.length} (the first match decides; no match: none)`],
  ]);
  if (view.rules.length > 0) {
    lines.push("");
    lines.push(
      ...formatTable(
        ["LINE", "IDENTITY", "EXPORT", "GRANT"],
        view.rules.map((rule) => [String(rule.line), rule.identity, rule.export, rule.grant]),
      ),
    );
  }
  return lines;
}

export function addAccessCommands(program: Command): void {
  const access = program
    .command("access")
    .description("NBD access rules: show them, reload the file")
    .addHelpText("after", "\nExamples:\n  $ blocksnap access show\n  $ blocksnap access reload\n");

  addCommonOptions(access.command("show").description("show the access rules in force"))
    .addHelpText("after", "\nExample:\n  $ blocksnap access show --json\n")
    .action(
      clientAction<CommonOptions>(async ({ client, json }) => {
        const view = await client.get<AccessRulesView>("/v1/access");
        if (json) return writeJson(view);
        for (const line of accessRulesLines(view)) writeLine(line);
      }),
    );

  addCommonOptions(
    access
      .command("reload")
      .description("reread the access file (as SIGHUP does); a bad file keeps the rules in force"),
  )
    .addHelpText("after", "\nExample:\n  $ blocksnap access reload\n")
    .action(
      clientAction<CommonOptions>(async ({ client, json }) => {
        const view = await client.post<AccessRulesView>("/v1/access/reload", {});
        if (json) return writeJson(view);
        for (const line of accessRulesLines(view)) writeLine(line);
      }),
    );
}

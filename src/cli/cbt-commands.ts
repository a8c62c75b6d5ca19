/**
 * `blocksnap cbt info|read|mark-dirty`: change-block tracking of a device (blksnap's model: one byte per
 * block, the number of the take after which the block last changed; see docs/design/semantics.md).
 */
import { writeFile } from "node:fs/promises";
import type { Command } from "commander";
import type { CbtInfoView, CbtMapJsonView } from "../daemon/api-types.js";
import { addCommonOptions, type CommonOptions, clientAction } from "./command-context.js";
import { rangeArgument } from "./option-parsers.js";
import { formatFields, writeJson, writeLine } from "./output.js";
import type { ParsedRange } from "./units.js";

interface CbtReadOptions extends CommonOptions {
  readonly out: string;
}

interface CbtMarkDirtyOptions extends CommonOptions {
  readonly range: ParsedRange[];
}

function cbtPath(name: string, suffix = ""): string {
  return `/v1/devices/${encodeURIComponent(name)}/cbt${suffix}`;
}

export function cbtInfoLines(info: CbtInfoView): string[] {
  return formatFields([
    ["block size", `${info.blockSizeBytes}`],
    ["device size", `${info.deviceSizeBytes}`],
    ["block count", `${info.blockCount}`],
    ["generation id", info.generationId],
    ["changes number", `${info.changesNumber}`],
    ["generation", `${info.generationReason}, since ${info.generationStartedAt}`],
  ]);
}

export function addCbtCommands(program: Command): void {
  const cbt = program
    .command("cbt")
    .description("change-block tracking: info, map, mark dirty")
    .addHelpText(
      "after",
      "\nExamples:\n  $ blocksnap cbt info disk0\n  $ blocksnap cbt read disk0 --out /tmp/disk0.cbt\n",
    );

  addCommonOptions(
    cbt.command("info").description("show a device's CBT parameters").argument("<name>", "device name"),
  )
    .addHelpText("after", "\nExample:\n  $ blocksnap cbt info disk0\n")
    .action(
      clientAction<CommonOptions>(async ({ client, json }, [name]) => {
        const info = await client.get<CbtInfoView>(cbtPath(name!));
        if (json) return writeJson(info);
        for (const line of cbtInfoLines(info)) writeLine(line);
      }),
    );

  addCommonOptions(
    cbt
      .command("read")
      .description("write the CBT map (one byte per block) to a file")
      .argument("<name>", "device name")
      .requiredOption(
        "--out <file>",
        "where to write the raw map ('-' for stdout; with --json, stdout gets one JSON document with the map in mapBase64)",
      ),
  )
    .addHelpText("after", "\nExample:\n  $ blocksnap cbt read disk0 --out /tmp/disk0.cbt\n")
    .action(
      clientAction<CbtReadOptions>(async ({ client, json }, [name], options) => {
        const view = await client.get<CbtMapJsonView>(cbtPath(name!, "/map?format=base64"));
        const map = Buffer.from(view.mapBase64, "base64");
        if (options.out === "-") {
          // Both want stdout: under --json the one JSON document carries the map itself, as the API does.
          if (json) return writeJson({ ...view, out: "-", bytesWritten: map.byteLength });
          process.stdout.write(map);
          return;
        }
        await writeFile(options.out, map);
        const { mapBase64: _map, ...info } = view;
        if (json) return writeJson({ ...info, out: options.out, bytesWritten: map.byteLength });
        writeLine(
          `wrote ${map.byteLength} bytes (one per ${info.blockSizeBytes}-byte block) to ${options.out}`,
        );
        for (const line of cbtInfoLines(info)) writeLine(line);
      }),
    );

  addCommonOptions(
    cbt
      .command("mark-dirty")
      .description("mark byte ranges as changed (they are reported by this and the next snapshot)")
      .argument("<name>", "device name")
      .requiredOption(
        "--range <offset:length...>",
        "byte range OFFSET:LENGTH, K/M/G/T suffixes; repeatable",
        rangeArgument,
      ),
  )
    .addHelpText("after", "\nExample:\n  $ blocksnap cbt mark-dirty disk0 --range 0:1M --range 4G:64K\n")
    .action(
      clientAction<CbtMarkDirtyOptions>(async ({ client, json }, [name], options) => {
        const info = await client.post<CbtInfoView>(cbtPath(name!, "/mark-dirty"), { ranges: options.range });
        if (json) return writeJson(info);
        writeLine(
          `marked ${options.range.length} range${options.range.length === 1 ? "" : "s"} dirty on ${name}`,
        );
      }),
    );
}

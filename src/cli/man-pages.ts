/**
 * Man pages (section 8) rendered from the commander program itself, so `man blocksnap-device` and
 * `blocksnap device add --help` can never disagree: the descriptions, arguments, options, defaults and the
 * examples that every command's help ends with. One page for the program and its single commands
 * (`blocksnap(8)`: serve, status, …), one per command group (`blocksnap-device(8)`, `blocksnap-snapshot(8)`, …).
 *
 * `blocksnap man [PAGE]` prints one page as roff; `blocksnap man --install DIR` writes them all.
 */
import { mkdir, writeFile } from "node:fs/promises";
import { join } from "node:path";
import type { Command, Option } from "commander";

export interface ManPage {
  /** e.g. "blocksnap-device" */
  readonly name: string;
  readonly roff: string;
}

/** Every page of the program: the main page first, then one per group, in program order. */
export function renderManPages(program: Command, version: string): ManPage[] {
  const visible = program.commands.filter((command) => !isHidden(command));
  const groups = visible.filter((command) => command.commands.length > 0);
  const singles = visible.filter((command) => command.commands.length === 0);
  const groupPageNames = groups.map((group) => `${program.name()}-${group.name()}`);
  const pages: ManPage[] = [];
  const main = page(program.name(), program.description(), version);
  main.section("SYNOPSIS");
  main.line(`.B ${roff(program.name())}`);
  main.line(roff("COMMAND [ARGUMENTS] [OPTIONS]"));
  main.section("COMMANDS");
  for (const command of singles) main.command(command, [program.name()]);
  for (const group of groups) {
    main.line(".TP");
    main.line(`.B ${roff(`${program.name()} ${group.name()}`)}`);
    main.line(roff(`${group.description()}: see ${program.name()}-${group.name()}(8)`));
  }
  main.examples(program);
  main.seeAlso(groupPageNames);
  pages.push({ name: program.name(), roff: main.text() });
  for (const group of groups) {
    const name = `${program.name()}-${group.name()}`;
    const groupPage = page(name, group.description(), version);
    groupPage.section("SYNOPSIS");
    for (const command of group.commands.filter((child) => !isHidden(child))) {
      groupPage.line(`.B ${roff(`${program.name()} ${group.name()} ${command.name()}`)}`);
      groupPage.line(roff(`${argumentsUsage(command)} [OPTIONS]`.trim()));
      groupPage.line(".br");
    }
    groupPage.section("COMMANDS");
    for (const command of group.commands.filter((child) => !isHidden(child))) {
      groupPage.command(command, [program.name(), group.name()]);
    }
    groupPage.examples(group);
    groupPage.seeAlso([program.name(), ...groupPageNames.filter((other) => other !== name)]);
    pages.push({ name, roff: groupPage.text() });
  }
  return pages;
}

export async function installManPages(pages: readonly ManPage[], directory: string): Promise<string[]> {
  await mkdir(directory, { recursive: true });
  const written: string[] = [];
  for (const manPage of pages) {
    const path = join(directory, `${manPage.name}.8`);
    await writeFile(path, manPage.roff, { mode: 0o644 });
    written.push(path);
  }
  return written;
}

function page(name: string, description: string, version: string) {
  const lines = [
    `.TH ${roff(name.toUpperCase())} 8 "" "${roff(`blocksnap ${version}`)}" "blocksnap manual"`,
    ".SH NAME",
    `${roff(name)} \\- ${roff(description)}`,
  ];
  return {
    line: (text: string) => lines.push(text),
    section: (title: string) => lines.push(`.SH ${title}`),
    command(command: Command, parents: readonly string[]): void {
      lines.push(".SS", `${roff([...parents, command.name()].join(" "))} ${roff(argumentsUsage(command))}`);
      lines.push(roff(command.description()));
      for (const argument of command.registeredArguments) {
        lines.push(".TP", `.I ${roff(argument.name())}`, roff(argument.description));
      }
      for (const option of command.options.filter((candidate) => !candidate.hidden)) {
        lines.push(".TP", `.B ${roff(option.flags)}`, roff(optionDescription(option)));
      }
      const example = afterHelpText(command);
      if (example !== "") lines.push(".PP", ".nf", ...example.split("\n").map(roff), ".fi");
    },
    examples(command: Command): void {
      const example = afterHelpText(command);
      if (example === "") return;
      lines.push(".SH EXAMPLES", ".nf", ...example.split("\n").map(roff), ".fi");
    },
    seeAlso(names: readonly string[]): void {
      lines.push(".SH SEE ALSO", names.map((other) => `${roff(other)}(8)`).join(", "));
    },
    text: () => `${lines.join("\n")}\n`,
  };
}

function isHidden(command: Command): boolean {
  return (command as unknown as { _hidden?: boolean })._hidden === true;
}

function argumentsUsage(command: Command): string {
  return command.registeredArguments
    .map((argument) => {
      const name = `${argument.name()}${argument.variadic ? "..." : ""}`;
      return argument.required ? `<${name}>` : `[${name}]`;
    })
    .join(" ");
}

function optionDescription(option: Option): string {
  const parts = [option.description];
  if (option.argChoices !== undefined) parts.push(`(one of: ${option.argChoices.join(", ")})`);
  if (option.defaultValue !== undefined && option.defaultValue !== false) {
    parts.push(`(default: ${String(option.defaultValue)})`);
  }
  if (option.mandatory) parts.push("(required)");
  return parts.join(" ");
}

/** The text addHelpText("after", …) adds to `--help` (the example), without its leading blank line. */
function afterHelpText(command: Command): string {
  let text = "";
  // commander's Command is an EventEmitter; its typings do not say so.
  (command as unknown as NodeJS.EventEmitter).emit("afterHelp", {
    error: false,
    command,
    write: (chunk: string) => (text += chunk),
  });
  return text
    .replace(/^\n+/, "")
    .replace(/^Examples?:\n/, "")
    .trimEnd()
    .split("\n")
    .map((line) => line.replace(/^ {2}/, ""))
    .join("\n");
}

/** roff: backslashes and hyphens escaped, a leading dot or quote neutralised. */
function roff(text: string): string {
  return text
    .replace(/\\/g, "\\e")
    .replace(/-/g, "\\-")
    .replace(/^([.'])/gm, "\\&$1");
}

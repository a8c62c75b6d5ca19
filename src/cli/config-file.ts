/**
 * The configuration file of `blocksnap serve` (docs/cli.md, "Configuration file"): `--config FILE`, else
 * /etc/blocksnap/blocksnap.conf when it exists (`--config none` reads none). One `key = value` per line,
 * the keys being serve's long options without the dashes (`nbd-listen = 127.0.0.1:10809`); a switch takes
 * `true` or `false`; blank lines and lines starting with `#` are ignored (a `#` later in a line is part of
 * the value). Values go through the same parsers and choices as the flags, so a value the flag would refuse
 * is refused here, and a flag given on the command line wins over the file.
 *
 * Any problem — an unknown key, a bad value, a key set twice, a line that is no `key = value` — is one
 * error `FILE:LINE: …` (usage exit code 2) and nothing starts: a half-read configuration could open what
 * the admin meant to keep closed. Not done: includes, sections, quoting, environment expansion.
 */
import { readFile } from "node:fs/promises";
import type { Command, Option } from "commander";
import { CliError, exitCodeUsage } from "./cli-error.js";

export const defaultConfigPath = "/etc/blocksnap/blocksnap.conf";
/** Far above any real configuration; a bigger file is a mistake (a disk image named by accident). */
const configBytesMax = 64 * 1024;

interface ConfigEntry {
  readonly key: string;
  readonly value: string;
  readonly lineNumber: number;
}

function configError(file: string, lineNumber: number | null, message: string): CliError {
  return new CliError(`${file}${lineNumber === null ? "" : `:${lineNumber}`}: ${message}`, {
    errno: "EINVAL",
    exitCode: exitCodeUsage,
  });
}

/** The lines of a file as entries; syntax errors only (the keys are checked against the command later). */
export function parseConfigText(text: string, file: string): ConfigEntry[] {
  const entries: ConfigEntry[] = [];
  const seen = new Map<string, number>();
  const lines = text.split("\n");
  for (let index = 0; index < lines.length; index++) {
    const lineNumber = index + 1;
    const line = (lines[index] ?? "").trim();
    if (line === "" || line.startsWith("#")) continue;
    const match = /^([A-Za-z0-9-]+)\s*=\s*(.*)$/.exec(line);
    if (match === null)
      throw configError(file, lineNumber, `expected key = value, got ${JSON.stringify(line)}`);
    const key = match[1] as string;
    const value = match[2] as string;
    if (value === "") throw configError(file, lineNumber, `${key} has no value`);
    const first = seen.get(key);
    if (first !== undefined) throw configError(file, lineNumber, `${key} is already set at line ${first}`);
    seen.set(key, lineNumber);
    entries.push({ key, value, lineNumber });
  }
  return entries;
}

/**
 * Sets each entry on `command` as if its flag had been given, unless the flag was given on the command
 * line (or a key names no option of the command, or its value is refused: then it throws).
 */
export function applyConfigEntries(command: Command, entries: readonly ConfigEntry[], file: string): void {
  for (const { key, value, lineNumber } of entries) {
    const option = command.options.find((candidate: Option) => candidate.long === `--${key}`);
    if (option === undefined || key === "config" || key === "help") {
      throw configError(
        file,
        lineNumber,
        `unknown key ${JSON.stringify(key)} (${command.name()} has no --${key})`,
      );
    }
    const name = option.attributeName();
    const parsed = parseValue(option, key, value, (message) => configError(file, lineNumber, message));
    if (command.getOptionValueSource(name) === "cli" || parsed === undefined) continue;
    command.setOptionValueWithSource(name, parsed, "config");
  }
}

function parseValue(option: Option, key: string, value: string, fail: (message: string) => Error): unknown {
  if (!option.required && !option.optional) {
    if (value === "true") return true;
    if (value === "false") return undefined;
    throw fail(`${key} is a switch: expected true or false, got ${JSON.stringify(value)}`);
  }
  if (option.argChoices !== undefined && !option.argChoices.includes(value)) {
    throw fail(`${key}: expected one of ${option.argChoices.join(", ")}, got ${JSON.stringify(value)}`);
  }
  if (option.parseArg === undefined) return value;
  try {
    return option.parseArg(value, undefined);
  } catch (error) {
    throw fail(`${key}: ${(error as Error).message}`);
  }
}

/**
 * Reads the file that applies (`--config FILE`, else the default when it exists) into `command`'s options.
 * Returns the file read, or null.
 */
export async function loadConfigFile(
  command: Command,
  defaultPath = defaultConfigPath,
): Promise<string | null> {
  const given = command.getOptionValue("config") as string | undefined;
  if (given === "none") return null;
  const file = given ?? defaultPath;
  let text: string;
  try {
    const content = await readFile(file);
    if (content.byteLength > configBytesMax) {
      throw configError(file, null, `larger than ${configBytesMax} bytes: not a configuration file`);
    }
    text = content.toString("utf8");
  } catch (error) {
    if (error instanceof CliError) throw error;
    const code = (error as { code?: unknown }).code;
    if (given === undefined && code === "ENOENT") return null;
    throw new CliError(`cannot read the configuration file ${file}: ${(error as Error).message}`, {
      errno: typeof code === "string" ? code : "EIO",
      exitCode: exitCodeUsage,
    });
  }
  applyConfigEntries(command, parseConfigText(text, file), file);
  return file;
}

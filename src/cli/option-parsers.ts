/**
 * commander argument parsers for sizes, ranges and counts (units.ts). A syntax error becomes commander's
 * InvalidArgumentError, which the program reports as a usage error (exit 2).
 */
import { InvalidArgumentError } from "commander";
import { type ParsedRange, parseCount, parseRange, parseSize } from "./units.js";

function asUsage<T>(parse: () => T): T {
  try {
    return parse();
  } catch (error) {
    throw new InvalidArgumentError((error as Error).message);
  }
}

export function sizeArgument(text: string): number {
  return asUsage(() => parseSize(text));
}

/** For repeatable / variadic `--range`: collects every value. */
export function rangeArgument(text: string, previous: ParsedRange[] | undefined): ParsedRange[] {
  return [...(previous ?? []), asUsage(() => parseRange(text))];
}

/** For repeatable / variadic string options such as `--device`. */
export function collectArgument(text: string, previous: string[] | undefined): string[] {
  return [...(previous ?? []), text];
}

export function countArgument(what: string, max: number): (text: string) => number {
  return (text) => asUsage(() => parseCount(text, what, max));
}

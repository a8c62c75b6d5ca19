/**
 * Human output: aligned tables and `key: value` blocks, short enough to read at a glance; and JSON output
 * (`--json`), which is the control API's response body, pretty-printed. Human text goes to stdout, errors
 * to stderr.
 */
export function writeLine(text = ""): void {
  process.stdout.write(`${text}\n`);
}

export function writeJson(value: unknown): void {
  process.stdout.write(`${JSON.stringify(value, null, 2)}\n`);
}

/** One JSON document per line, for streams (`snapshot watch --json`). */
export function writeJsonLine(value: unknown): void {
  process.stdout.write(`${JSON.stringify(value)}\n`);
}

/** Columns separated by two spaces, each as wide as its widest cell; the last column is not padded. */
export function formatTable(headers: readonly string[], rows: readonly (readonly string[])[]): string[] {
  const widths = headers.map((header, column) =>
    Math.max(header.length, ...rows.map((row) => (row[column] ?? "").length)),
  );
  const render = (cells: readonly string[]): string =>
    cells
      .map((cell, column) => (column === cells.length - 1 ? cell : cell.padEnd(widths[column] ?? 0)))
      .join("  ")
      .trimEnd();
  return [render(headers), ...rows.map(render)];
}

/** `key:  value` lines with the values aligned. */
export function formatFields(fields: readonly (readonly [string, string])[], indent = ""): string[] {
  const width = Math.max(0, ...fields.map(([key]) => key.length + 1));
  return fields.map(([key, value]) => `${indent}${`${key}:`.padEnd(width)}  ${value}`);
}

export function formatTimeMs(timeMs: number | null): string {
  return timeMs === null ? "-" : new Date(timeMs).toISOString();
}

/** A duration: three significant decimals are plenty for a human. */
export function formatMs(durationMs: number | null): string {
  return durationMs === null ? "-" : `${Number(durationMs.toFixed(3))} ms`;
}

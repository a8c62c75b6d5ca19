/**
 * Parsing and printing of the CLI's sizes and byte ranges (docs/design/semantics.md: bytes everywhere, K/M/G/T
 * suffixes are powers of 1024). `SIZE` is digits with an optional suffix (`4096`, `64K`, `1G`; `KiB` and
 * `KB` are read as K too); `RANGE` is `OFFSET:LENGTH`, both sizes, the length at least one byte. Fractions,
 * signs and values beyond 2^53 - 1 are refused rather than rounded.
 */
const unitShifts: Readonly<Record<string, number>> = { "": 0, K: 10, M: 20, G: 30, T: 40 };
const sizePattern = /^(\d+)(?:([KMGT])(?:I?B)?|B)?$/;

export class UnitSyntaxError extends Error {
  constructor(message: string) {
    super(message);
    this.name = "UnitSyntaxError";
  }
}

export function parseSize(text: string): number {
  const match = sizePattern.exec(text.trim().toUpperCase());
  if (match === null) {
    throw new UnitSyntaxError(
      `invalid size ${JSON.stringify(text)}: expected bytes with an optional K, M, G or T suffix`,
    );
  }
  const digits = match[1]!;
  const shift = unitShifts[match[2] ?? ""]!;
  const value = BigInt(digits) * (1n << BigInt(shift));
  if (value > BigInt(Number.MAX_SAFE_INTEGER))
    throw new UnitSyntaxError(`size ${JSON.stringify(text)} is too large`);
  return Number(value);
}

export interface ParsedRange {
  readonly offsetBytes: number;
  readonly lengthBytes: number;
}

export function parseRange(text: string): ParsedRange {
  const parts = text.split(":");
  if (parts.length !== 2) {
    throw new UnitSyntaxError(`invalid range ${JSON.stringify(text)}: expected OFFSET:LENGTH (e.g. 1M:64K)`);
  }
  const offsetBytes = parseSize(parts[0]!);
  const lengthBytes = parseSize(parts[1]!);
  if (lengthBytes === 0)
    throw new UnitSyntaxError(`invalid range ${JSON.stringify(text)}: the length is zero`);
  if (offsetBytes + lengthBytes > Number.MAX_SAFE_INTEGER) {
    throw new UnitSyntaxError(`range ${JSON.stringify(text)} ends beyond 2^53 bytes`);
  }
  return { offsetBytes, lengthBytes };
}

/** A plain non-negative integer (milliseconds, counts), no suffixes. */
export function parseCount(text: string, what: string, max: number): number {
  if (!/^\d+$/.test(text.trim()))
    throw new UnitSyntaxError(`invalid ${what} ${JSON.stringify(text)}: expected an integer`);
  const value = Number(text.trim());
  if (!Number.isSafeInteger(value) || value > max) {
    throw new UnitSyntaxError(`${what} ${JSON.stringify(text)} is out of range (at most ${max})`);
  }
  return value;
}

const unitNames = ["B", "KiB", "MiB", "GiB", "TiB"] as const;

/** Short human form: exact units when the value divides evenly (`64 MiB`), else one decimal (`1.5 GiB`). */
export function formatSize(sizeBytes: number): string {
  let unitIndex = 0;
  while (unitIndex < unitNames.length - 1 && sizeBytes >= 1024 ** (unitIndex + 1)) unitIndex++;
  const value = sizeBytes / 1024 ** unitIndex;
  const text = Number.isInteger(value) ? String(value) : value.toFixed(1);
  return `${text} ${unitNames[unitIndex]}`;
}

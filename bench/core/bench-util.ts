/**
 * Helpers shared by the core-engine benchmarks: machine facts, medians, Markdown tables, temp dirs.
 *
 * Every benchmark in bench/core is a script that prints one Markdown section on stdout (progress goes to
 * stderr) so that run-all.ts can concatenate them into bench/results/core.md. Run alone, a script first
 * prints the machine facts; run-all sets `BLOCKSNAP_BENCH_CHILD=1` and prints them once itself.
 * These are measurements, not tests: nothing here asserts on a time.
 */
import { mkdtempSync, readFileSync, rmSync } from "node:fs";
import { cpus, loadavg, release, tmpdir, totalmem } from "node:os";
import { join } from "node:path";
import { performance } from "node:perf_hooks";

export const KiB = 1024;
export const MiB = 1024 * KiB;
export const GiB = 1024 * MiB;
export const TiB = 1024 * GiB;

/**
 * utime + stime of a /proc/PID/stat or /proc/PID/task/TID/stat file, in clock ticks (100 per second here).
 * The fields are counted after the command name, which may hold spaces: utime is field 14, stime 15.
 */
export function statCpuTicks(statPath: string): number {
  const stat = readFileSync(statPath, "utf8");
  const fields = stat.slice(stat.lastIndexOf(")") + 2).split(" ");
  return Number(fields[11]) + Number(fields[12]);
}

export interface MachineFacts {
  readonly cpuModel: string;
  readonly cpuCount: number;
  readonly memoryGiB: number;
  readonly nodeVersion: string;
  readonly kernel: string;
  readonly dateIso: string;
  /** 1-minute load average at the start: other work on a shared machine skews every figure. */
  readonly loadAverage1m: number;
}

export function machineFacts(): MachineFacts {
  const cpuList = cpus();
  return {
    cpuModel: cpuList[0]?.model.trim() ?? "unknown",
    cpuCount: cpuList.length,
    memoryGiB: Math.round(totalmem() / GiB),
    nodeVersion: process.version,
    kernel: `${process.platform} ${release()}`,
    dateIso: new Date().toISOString(),
    loadAverage1m: loadavg()[0] ?? Number.NaN,
  };
}

export function machineFactsMarkdown(facts: MachineFacts = machineFacts()): string {
  return markdownTable(
    ["CPU", "cores", "RAM", "Node", "kernel", "date", "load avg 1 min"],
    [
      [
        facts.cpuModel,
        String(facts.cpuCount),
        `${facts.memoryGiB} GiB`,
        facts.nodeVersion,
        facts.kernel,
        facts.dateIso,
        fixed(facts.loadAverage1m, 2),
      ],
    ],
  );
}

/** Prints a finished section; a standalone run prints the machine facts above it. */
export function printSection(markdown: string): void {
  if (process.env.BLOCKSNAP_BENCH_CHILD !== "1") process.stdout.write(`${machineFactsMarkdown()}\n`);
  process.stdout.write(`${markdown.trimEnd()}\n`);
}

export function progress(message: string): void {
  process.stderr.write(`  ${message}\n`);
}

export function median(values: readonly number[]): number {
  if (values.length === 0) return Number.NaN;
  const sorted = [...values].sort((a, b) => a - b);
  const middle = Math.floor(sorted.length / 2);
  return sorted.length % 2 === 1 ? sorted[middle]! : (sorted[middle - 1]! + sorted[middle]!) / 2;
}

export function maximum(values: readonly number[]): number {
  return values.reduce((max, value) => Math.max(max, value), Number.NEGATIVE_INFINITY);
}

/** Value at quantile q (0..1) by nearest rank. */
export function quantile(values: readonly number[], q: number): number {
  if (values.length === 0) return Number.NaN;
  const sorted = [...values].sort((a, b) => a - b);
  const rank = Math.min(sorted.length - 1, Math.max(0, Math.ceil(q * sorted.length) - 1));
  return sorted[rank]!;
}

/**
 * Runs a full garbage collection when Node was started with --expose-gc (run-all.ts does so), so that
 * garbage from one pass is not collected on the clock of the next. Without the flag it does nothing.
 */
export function collectGarbageIfExposed(): void {
  globalThis.gc?.();
}

/** Wall time of one awaited call, in milliseconds. */
export async function timeMs(operation: () => Promise<void>): Promise<number> {
  const startMs = performance.now();
  await operation();
  return performance.now() - startMs;
}

export function mibPerSecond(bytes: number, elapsedMs: number): number {
  return bytes / MiB / (elapsedMs / 1000);
}

/** Fixed number of decimals, with thousands left ungrouped so the tables stay machine-readable. */
export function fixed(value: number, digits: number): string {
  return Number.isFinite(value) ? value.toFixed(digits) : "n/a";
}

export function formatBytes(bytes: number): string {
  if (bytes >= GiB) return `${fixed(bytes / GiB, 2)} GiB`;
  if (bytes >= MiB) return `${fixed(bytes / MiB, 2)} MiB`;
  if (bytes >= KiB) return `${fixed(bytes / KiB, 1)} KiB`;
  return `${bytes} B`;
}

export function markdownTable(headers: readonly string[], rows: readonly (readonly string[])[]): string {
  const lines = [`| ${headers.join(" | ")} |`, `|${headers.map(() => "---").join("|")}|`];
  for (const row of rows) lines.push(`| ${row.join(" | ")} |`);
  return `${lines.join("\n")}\n`;
}

/** Deterministic non-zero bytes (a compressible-nothing pattern is irrelevant here: no compression). */
export function patternBytes(lengthBytes: number, seed: number): Uint8Array {
  const bytes = new Uint8Array(lengthBytes);
  let state = (seed * 2654435761) >>> 0 || 1;
  for (let i = 0; i < lengthBytes; i++) {
    state ^= state << 13;
    state ^= state >>> 17;
    state ^= state << 5;
    bytes[i] = state & 0xff;
  }
  return bytes;
}

/** A scratch directory under the OS temp dir, removed by the returned function. */
export function scratchDir(label: string): { path: string; remove: () => void } {
  const path = mkdtempSync(join(tmpdir(), `blocksnap-bench-${label}-`));
  return { path, remove: () => rmSync(path, { recursive: true, force: true }) };
}

/** A small seeded PRNG (xorshift32) so every run issues the same offsets. */
export function seededRandom(seed: number): () => number {
  let state = seed >>> 0 || 1;
  return () => {
    state ^= state << 13;
    state >>>= 0;
    state ^= state >>> 17;
    state ^= state << 5;
    state >>>= 0;
    return state / 2 ** 32;
  };
}

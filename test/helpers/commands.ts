/**
 * Running external tools from tests. Always asynchronous: the code under test may serve the very files
 * or sockets the tool uses on this event loop, and a synchronous spawn would deadlock it.
 */
import { execFile } from "node:child_process";
import { accessSync, constants, statSync } from "node:fs";
import { delimiter, join } from "node:path";

export interface CommandResult {
  readonly code: number;
  readonly stdout: string;
  readonly stderr: string;
}

/** Runs a command; never rejects on a non-zero exit (the test asserts on it). */
export function run(
  file: string,
  args: readonly string[],
  options: { readonly timeoutMs?: number; readonly env?: NodeJS.ProcessEnv } = {},
): Promise<CommandResult> {
  return new Promise((resolve) => {
    execFile(
      file,
      args,
      {
        timeout: options.timeoutMs ?? 120_000,
        maxBuffer: 64 << 20,
        encoding: "utf8",
        env: options.env ?? process.env,
      },
      (error, stdout, stderr) => {
        const code = error ? (typeof error.code === "number" ? error.code : 1) : 0;
        resolve({ code, stdout, stderr });
      },
    );
  });
}

/** Runs a command, throws with its output when it fails, and returns its stdout. */
export async function runOk(file: string, args: readonly string[], timeoutMs?: number): Promise<string> {
  const result = await run(file, args, timeoutMs === undefined ? {} : { timeoutMs });
  if (result.code !== 0) {
    throw new Error(`${file} ${args.join(" ")} exited ${result.code}\n${result.stdout}\n${result.stderr}`);
  }
  return result.stdout;
}

/** Finds an executable on PATH and in the sbin directories (root tools live there). */
export function which(name: string): string | undefined {
  if (name.includes("/")) return isExecutableFile(name) ? name : undefined;
  const directories = [
    ...(process.env.PATH ?? "").split(delimiter),
    "/usr/sbin",
    "/sbin",
    "/usr/bin",
    "/bin",
  ];
  for (const directory of directories) {
    if (!directory) continue;
    const path = join(directory, name);
    if (isExecutableFile(path)) return path;
  }
  return undefined;
}

/** A reason to skip when a tool is missing, else undefined. */
export function missingTools(...names: string[]): string | undefined {
  const missing = names.filter((name) => which(name) === undefined);
  return missing.length > 0 ? `requires ${missing.join(", ")} (not installed)` : undefined;
}

function isExecutableFile(path: string): boolean {
  try {
    accessSync(path, constants.X_OK);
    return statSync(path).isFile();
  } catch {
    return false;
  }
}

export const isRoot = process.getuid?.() === 0;

/**
 * Test helpers for the real `blocksnap` binary: run the CLI as a child process, and start / stop a daemon
 * (`blocksnap serve`) in a temporary state directory. Everything is asynchronous and bounded: a command
 * that does not finish within commandTimeoutMs is killed and reported, readiness is polled with a bounded
 * number of attempts, and no test sleeps for a fixed time.
 */
import assert from "node:assert/strict";
import { type ChildProcess, spawn } from "node:child_process";
import { request as httpRequest } from "node:http";
import { join } from "node:path";
import { fileURLToPath } from "node:url";

/** dist/test/cli/cli-harness.js → dist/src/cli/main.js */
export const cliPath = fileURLToPath(new URL("../../src/cli/main.js", import.meta.url));
const commandTimeoutMs = 60_000;
const readinessAttemptsMax = 250;
const readinessIntervalMs = 20;

export interface CommandResult {
  readonly code: number | null;
  readonly signal: NodeJS.Signals | null;
  readonly stdout: string;
  readonly stderr: string;
}

/** The environment of spawned processes, without the variables that would redirect them. */
export function cleanEnvironment(extra: Record<string, string> = {}): NodeJS.ProcessEnv {
  const env = { ...process.env };
  delete env.BLOCKSNAP_SOCKET;
  delete env.BLOCKSNAP_STATE_DIR;
  return { ...env, ...extra };
}

export function runCommand(
  command: string,
  args: readonly string[],
  options: { env?: NodeJS.ProcessEnv; input?: string } = {},
): Promise<CommandResult> {
  return new Promise((resolve, reject) => {
    const child = spawn(command, args, {
      env: options.env ?? cleanEnvironment(),
      stdio: ["pipe", "pipe", "pipe"],
    });
    let stdout = "";
    let stderr = "";
    child.stdout.setEncoding("utf8").on("data", (text: string) => {
      stdout += text;
    });
    child.stderr.setEncoding("utf8").on("data", (text: string) => {
      stderr += text;
    });
    const timer = setTimeout(() => child.kill("SIGKILL"), commandTimeoutMs);
    child.once("error", (error) => {
      clearTimeout(timer);
      reject(error);
    });
    child.once("close", (code, signal) => {
      clearTimeout(timer);
      resolve({ code, signal, stdout, stderr });
    });
    // A child that exits without reading its input (losetup, mkfs) makes this write fail with EPIPE: that
    // is not the command's failure, and its exit code says what happened.
    child.stdin.once("error", () => {});
    child.stdin.end(options.input ?? "");
  });
}

export function runCli(
  args: readonly string[],
  options: { env?: NodeJS.ProcessEnv } = {},
): Promise<CommandResult> {
  return runCommand(process.execPath, [cliPath, ...args], options);
}

/** GET over a Unix socket; resolves with the status code, rejects when nothing listens. */
function probe(socketPath: string, path: string): Promise<number> {
  return new Promise((resolve, reject) => {
    const request = httpRequest({ socketPath, path, agent: false }, (response) => {
      response.resume();
      response.once("end", () => resolve(response.statusCode ?? 0));
    });
    request.once("error", reject);
    request.end();
  });
}

export interface DaemonStartOptions {
  /** Extra `serve` arguments; default turns TCP and FUSE off. */
  readonly args?: readonly string[];
  readonly env?: NodeJS.ProcessEnv;
  /** Pass --state-dir (default true); false relies on the environment. */
  readonly passStateDir?: boolean;
  /** The control socket when `args` moves it with --socket (default: <state dir>/blocksnap.sock). */
  readonly controlSocket?: string;
}

export class DaemonProcess {
  readonly stateDir: string;
  readonly child: ChildProcess;
  readonly exited: Promise<{ code: number | null; signal: NodeJS.Signals | null }>;
  stderr = "";

  private readonly controlSocketPath: string;

  private constructor(stateDir: string, child: ChildProcess, controlSocket?: string) {
    this.stateDir = stateDir;
    this.child = child;
    this.controlSocketPath = controlSocket ?? join(stateDir, "blocksnap.sock");
    child.stderr?.setEncoding("utf8").on("data", (text: string) => {
      this.stderr += text;
    });
    this.exited = new Promise((resolve) => child.once("exit", (code, signal) => resolve({ code, signal })));
  }

  get controlSocket(): string {
    return this.controlSocketPath;
  }

  get nbdSocket(): string {
    return join(this.stateDir, "nbd.sock");
  }

  get pid(): number {
    assert.ok(this.child.pid !== undefined);
    return this.child.pid;
  }

  /** Starts `blocksnap serve` and waits until the control API answers. */
  static async start(stateDir: string, options: DaemonStartOptions = {}): Promise<DaemonProcess> {
    const args = [
      cliPath,
      "serve",
      ...(options.passStateDir === false ? [] : ["--state-dir", stateDir]),
      ...(options.args ?? ["--nbd-listen", "none", "--fuse-mount", "none"]),
    ];
    const child = spawn(process.execPath, args, {
      env: options.env ?? cleanEnvironment(),
      stdio: ["ignore", "ignore", "pipe"],
    });
    const daemon = new DaemonProcess(stateDir, child, options.controlSocket);
    let exited = false;
    void daemon.exited.then(() => {
      exited = true;
    });
    for (let attempt = 0; attempt < readinessAttemptsMax; attempt++) {
      if (exited) break;
      try {
        if ((await probe(daemon.controlSocket, "/v1/status")) === 200) return daemon;
      } catch {
        // Not listening yet.
      }
      await new Promise((resolve) => setTimeout(resolve, readinessIntervalMs));
    }
    child.kill("SIGKILL");
    await daemon.exited;
    assert.fail(`blocksnap serve did not become ready; stderr:\n${daemon.stderr}`);
  }

  /** Runs the CLI against this daemon (appends --state-dir). */
  cli(args: readonly string[]): Promise<CommandResult> {
    return runCli([...args, "--state-dir", this.stateDir]);
  }

  /** Runs the CLI with --json and parses stdout, asserting exit code 0. */
  async cliJson<T>(args: readonly string[]): Promise<T> {
    const result = await this.cli([...args, "--json"]);
    assert.equal(result.code, 0, `blocksnap ${args.join(" ")} failed: ${result.stderr}`);
    return JSON.parse(result.stdout) as T;
  }

  /** Runs the CLI and asserts exit code 0; returns stdout. */
  async cliOk(args: readonly string[]): Promise<string> {
    const result = await this.cli(args);
    assert.equal(result.code, 0, `blocksnap ${args.join(" ")} failed: ${result.stderr}`);
    return result.stdout;
  }

  async stop(
    signal: NodeJS.Signals = "SIGTERM",
  ): Promise<{ code: number | null; signal: NodeJS.Signals | null }> {
    if (this.child.exitCode === null && this.child.signalCode === null) this.child.kill(signal);
    return await this.exited;
  }
}

/** A CLI process running in the background (watch), with its output so far. */
export class BackgroundCli {
  stdout = "";
  stderr = "";
  readonly closed: Promise<CommandResult>;
  private readonly child: ChildProcess;
  private readonly outputListeners = new Set<() => void>();

  constructor(args: readonly string[]) {
    this.child = spawn(process.execPath, [cliPath, ...args], {
      env: cleanEnvironment(),
      stdio: ["ignore", "pipe", "pipe"],
    });
    this.child.stdout?.setEncoding("utf8").on("data", (text: string) => {
      this.stdout += text;
      for (const listener of this.outputListeners) listener();
    });
    this.child.stderr?.setEncoding("utf8").on("data", (text: string) => {
      this.stderr += text;
    });
    const timer = setTimeout(() => this.child.kill("SIGKILL"), commandTimeoutMs);
    this.closed = new Promise((resolve) =>
      this.child.once("close", (code, signal) => {
        clearTimeout(timer);
        for (const listener of this.outputListeners) listener();
        resolve({ code, signal, stdout: this.stdout, stderr: this.stderr });
      }),
    );
  }

  /** Sends `signal` (a client killed to test what it sees when it comes back). */
  kill(signal: NodeJS.Signals): void {
    this.child.kill(signal);
  }

  /** Resolves once stdout contains `text`; rejects if the process ends first. */
  waitForOutput(text: string): Promise<void> {
    return new Promise((resolve, reject) => {
      const check = (): void => {
        if (this.stdout.includes(text)) {
          this.outputListeners.delete(check);
          resolve();
        } else if (this.child.exitCode !== null || this.child.signalCode !== null) {
          this.outputListeners.delete(check);
          reject(
            new Error(`process ended before printing ${JSON.stringify(text)}: ${this.stdout}${this.stderr}`),
          );
        }
      };
      this.outputListeners.add(check);
      check();
    });
  }
}

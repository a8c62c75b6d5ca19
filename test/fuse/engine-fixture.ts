/**
 * Shared set-up for the snapshot scenarios of the FUSE face: an Engine (with the LoopFreezer the daemon
 * uses, so takes freeze the file systems mounted on loop devices over its FUSE files) served by a
 * FuseServer in a temp dir and, when asked, by an in-process NbdServer on a Unix socket in the same dir;
 * plus the file-system helpers the scenarios share (files with checksums, existence, child exit).
 *
 * Like FuseFixture, the servers run on this process's event loop: everything that touches the mount or the
 * socket runs in a child process, asynchronously.
 */
import { type ChildProcess, spawn } from "node:child_process";
import { mkdtemp, rm } from "node:fs/promises";
import { tmpdir } from "node:os";
import { join } from "node:path";
import type { TestContext } from "node:test";
import { Engine } from "../../src/engine/engine.js";
import { LoopFreezer } from "../../src/freeze/loop-freezer.js";
import { FuseServer } from "../../src/fuse/fuse-server.js";
import { NbdServer } from "../../src/nbd/nbd-server.js";
import { LoopsAndMounts, must, run, skipReason } from "./fuse-fixture.js";

export const MiB = 1024 * 1024;

export interface EngineFixtureOptions {
  /** Also serve the engine over NBD on `<temp dir>/nbd.sock`. */
  readonly nbd?: boolean;
}

export class EngineFixture extends LoopsAndMounts {
  readonly engine: Engine;
  readonly socketPath: string;
  private fuse: FuseServer | undefined;
  private nbd: NbdServer | undefined;

  private constructor(directory: string) {
    super(directory);
    this.socketPath = join(directory, "nbd.sock");
    const mountDir = this.mountDir;
    this.engine = new Engine({
      freezer: new LoopFreezer({ deviceFilePath: (name) => join(mountDir, name) }),
    });
  }

  /** A served fixture, or undefined after t.skip() with the reason. Cleanup is registered on `t`. */
  static async create(
    t: TestContext,
    tools: readonly string[],
    options: EngineFixtureOptions = {},
  ): Promise<EngineFixture | undefined> {
    const reason = await skipReason(tools);
    if (reason) {
      t.skip(reason);
      return undefined;
    }
    const fixture = new EngineFixture(await mkdtemp(join(tmpdir(), "blocksnap-fuse-snap-")));
    t.after(() => fixture.cleanup());
    fixture.fuse = await FuseServer.mount(fixture.engine, { mountDir: fixture.mountDir });
    if (options.nbd) {
      fixture.nbd = new NbdServer(fixture.engine);
      await fixture.nbd.listenUnix(fixture.socketPath);
    }
    return fixture;
  }

  /** The NBD URI of an export (origin `<device>` or image `<device>@<id>`). */
  nbdUri(exportName: string): string {
    if (!this.nbd) throw new Error("the fixture was created without NBD");
    return `nbd+unix:///${encodeURIComponent(exportName)}?socket=${this.socketPath}`;
  }

  /** Adds an origin device over a sparse file in the temp dir. */
  async addDevice(name: string, sizeBytes: number): Promise<void> {
    await this.engine.addDevice({ name, backendPath: this.backendPath(name), sizeBytes });
  }

  backendPath(name: string): string {
    return join(this.directory, `${name}.img`);
  }

  async cleanup(): Promise<void> {
    await this.releaseLoopsAndMounts();
    await this.nbd?.close();
    await this.fuse?.unmount();
    await this.engine.close();
    await rm(this.directory, { recursive: true, force: true });
  }
}

/** Writes five files of odd sizes named `<prefix>1..5` with random content, syncs; their sha256sum listing. */
export function writeFiles(directory: string, prefix: string): Promise<string> {
  const script = [
    "set -e",
    'cd "$1"',
    'for i in 1 2 3 4 5; do head -c $((i * 900001 + 3)) /dev/urandom > "$2$i"; done',
    "sync",
    'sha256sum "$2"*',
  ].join("\n");
  return must("sh", ["-c", script, "sh", directory, prefix]);
}

export function checksums(directory: string, prefix: string): Promise<string> {
  return must("sh", ["-c", 'cd "$1" && sha256sum "$2"*', "sh", directory, prefix]);
}

/** test -e in a child (the path may sit on our own FUSE mount). */
export async function exists(path: string): Promise<boolean> {
  return (await run("test", ["-e", path])).exitCode === 0;
}

export function exitOf(child: ChildProcess): Promise<number | null> {
  if (child.exitCode !== null || child.signalCode !== null) return Promise.resolve(child.exitCode);
  return new Promise((resolve) => child.once("exit", (code) => resolve(code)));
}

/** sha256 of a whole block device or file read with O_DIRECT, in a child. */
export async function directChecksum(path: string): Promise<string> {
  const output = await must("sh", [
    "-c",
    'dd if="$1" bs=1M iflag=direct status=none | sha256sum',
    "sh",
    path,
  ]);
  return output.split(" ")[0] ?? "";
}

/** Resolves with `promise`, or rejects naming `what` when it has not settled after `timeoutMs` (a hang). */
export function boundedBy<T>(promise: Promise<T>, timeoutMs: number, what: string): Promise<T> {
  return new Promise((resolve, reject) => {
    const timer = setTimeout(
      () => reject(new Error(`${what} did not finish within ${timeoutMs} ms`)),
      timeoutMs,
    );
    promise.then(
      (value) => {
        clearTimeout(timer);
        resolve(value);
      },
      (error: unknown) => {
        clearTimeout(timer);
        reject(error);
      },
    );
  });
}

export interface Load {
  /** Resolves at the first "pass" line; rejects if the load exits before. */
  readonly running: Promise<void>;
  readonly exited: Promise<number | null>;
  stderr(): string;
}

/**
 * Runs `sh -c script` with `args` as $1..; the script prints "pass" after each round. Killed at the
 * fixture's cleanup if it still runs, before anything is unmounted.
 */
export function startLoad(
  fixture: LoopsAndMounts,
  label: string,
  script: string,
  args: readonly string[],
): Load {
  const child = spawn("sh", ["-c", script, label, ...args], { stdio: ["ignore", "pipe", "pipe"] });
  fixture.adopt(child);
  let errors = "";
  child.stderr.on("data", (chunk: Buffer) => {
    errors += chunk.toString();
  });
  const exited = exitOf(child);
  const running = new Promise<void>((resolve, reject) => {
    child.stdout.on("data", (chunk: Buffer) => {
      if (chunk.toString().includes("pass")) resolve();
    });
    exited.then((code) => reject(new Error(`${label} ended before its first round (${code}): ${errors}`)));
  });
  // Awaited by the test; a load that dies while the test awaits something else must not crash the run.
  running.catch(() => {});
  return { running, exited, stderr: () => errors };
}

/**
 * Shared set-up for the root integration tests of the FUSE face: a temp dir, a StaticExportSource, a
 * mounted FuseServer, and bookkeeping of every loop device and file-system mount a test creates, so that
 * cleanup (t.after) detaches and unmounts them even when the test fails halfway.
 *
 * The FUSE server runs on this process's event loop. Everything that touches the mount therefore runs in
 * a child process, asynchronously (run()): a synchronous fs call or spawnSync on the mount would wait for
 * a reply that this very thread has to send.
 */
import { type ChildProcess, execFile } from "node:child_process";
import { access, mkdir, mkdtemp, readFile, rm, writeFile } from "node:fs/promises";
import { tmpdir } from "node:os";
import { join } from "node:path";
import type { TestContext } from "node:test";
import { FileBackend } from "../../src/backends/file-backend.js";
import { MemoryBackend } from "../../src/backends/memory-backend.js";
import { CheckedDevice } from "../../src/block/checked-device.js";
import type { BlockDevice } from "../../src/block/device.js";
import { type Export, StaticExportSource } from "../../src/block/export-source.js";
import { FuseServer } from "../../src/fuse/fuse-server.js";
import { which } from "../helpers/commands.js";

export interface RunResult {
  readonly exitCode: number | null;
  readonly stdout: string;
  readonly stderr: string;
}

/** Runs a command asynchronously; never rejects, reports the exit code. */
export function run(file: string, args: readonly string[], timeoutMs = 120_000): Promise<RunResult> {
  return new Promise((resolve) => {
    execFile(
      file,
      [...args],
      { timeout: timeoutMs, maxBuffer: 64 << 20, env: { ...process.env, LC_ALL: "C" } },
      (error, stdout, stderr) => {
        const code = (error as { code?: unknown } | null)?.code;
        resolve({
          exitCode: error ? (typeof code === "number" ? code : null) : 0,
          stdout,
          stderr: error && typeof code !== "number" ? `${stderr}${String(error)}` : stderr,
        });
      },
    );
  });
}

/** Runs a command that must succeed; the error names the command and its output. */
export async function must(file: string, args: readonly string[], timeoutMs?: number): Promise<string> {
  const result = await run(file, args, timeoutMs);
  if (result.exitCode !== 0) {
    throw new Error(
      `${file} ${args.join(" ")} failed (${result.exitCode}): ${result.stderr}${result.stdout}`,
    );
  }
  return result.stdout;
}

/** Why this machine cannot run a root FUSE test with `tools`, or undefined when it can. */
/**
 * Writes `data` at byte offset `offsetBytes` of a block device with one direct dd, reads the same range back
 * with another, and returns what was read (the unaligned-write scenario of the FUSE issue).
 */
export async function directWriteThenRead(
  device: string,
  offsetBytes: number,
  data: Uint8Array,
  scratchDirectory: string,
): Promise<Buffer> {
  const source = join(scratchDirectory, `write-${offsetBytes}.bin`);
  const target = join(scratchDirectory, `read-${offsetBytes}.bin`);
  await writeFile(source, data);
  const common = [`bs=${data.byteLength}`, "count=1", "status=none"];
  await must("dd", [
    `if=${source}`,
    `of=${device}`,
    ...common,
    `seek=${offsetBytes}`,
    "oflag=direct,seek_bytes",
  ]);
  await must("dd", [
    `if=${device}`,
    `of=${target}`,
    ...common,
    `skip=${offsetBytes}`,
    "iflag=direct,skip_bytes",
  ]);
  return readFile(target);
}

export async function skipReason(tools: readonly string[]): Promise<string | undefined> {
  if (process.getuid?.() !== 0) return "needs root (mounts FUSE, attaches loop devices)";
  try {
    await access("/dev/fuse");
  } catch {
    return "/dev/fuse is absent";
  }
  for (const tool of ["mount", "umount", "losetup", ...tools]) {
    if (!which(tool)) return `${tool} is not installed`;
  }
  return undefined;
}

/**
 * Loop devices over FUSE files, the file systems mounted on them and the child processes that use them,
 * remembered so that cleanup undoes them even when a test fails halfway: children killed first, then
 * lazy unmounts, then detaches, each in reverse order.
 */
export class LoopsAndMounts {
  readonly directory: string;
  readonly mountDir: string;
  private readonly loops: string[] = [];
  private readonly mounts: string[] = [];
  private readonly children: ChildProcess[] = [];

  protected constructor(directory: string) {
    this.directory = directory;
    this.mountDir = join(directory, "mnt");
  }

  filePath(name: string): string {
    return join(this.mountDir, name);
  }

  /** losetup --direct-io=on [-r] -f --show on the FUSE file of `name`; detached at cleanup. */
  async attachLoop(name: string, readOnly = false): Promise<string> {
    const args = ["--direct-io=on", ...(readOnly ? ["-r"] : []), "-f", "--show", this.filePath(name)];
    const device = (await must("losetup", args)).trim();
    this.loops.push(device);
    return device;
  }

  async detachLoop(device: string): Promise<void> {
    await must("losetup", ["-d", device]);
    this.loops.splice(this.loops.indexOf(device), 1);
  }

  /** Mounts `device` at a new directory under the temp dir; unmounted at cleanup. */
  async mountFs(device: string, label: string, options: readonly string[] = []): Promise<string> {
    const target = join(this.directory, label);
    await mkdir(target, { recursive: true });
    await must("mount", [...options, device, target]);
    this.mounts.push(target);
    return target;
  }

  async unmountFs(target: string, lazy = false): Promise<void> {
    await must("umount", [...(lazy ? ["-l"] : []), target]);
    this.forgetFs(target);
  }

  /** The test unmounted `target` itself (e.g. lazily). */
  forgetFs(target: string): void {
    this.mounts.splice(this.mounts.indexOf(target), 1);
  }

  /** A child that may still use the loops and mounts when the test ends: SIGKILLed first at cleanup. */
  adopt(child: ChildProcess): void {
    this.children.push(child);
  }

  protected async releaseLoopsAndMounts(): Promise<void> {
    for (const child of this.children.reverse()) {
      if (child.exitCode !== null || child.signalCode !== null) continue;
      const exited = new Promise((resolve) => child.once("exit", resolve));
      child.kill("SIGKILL");
      await exited;
    }
    this.children.length = 0;
    for (const target of this.mounts.reverse()) await run("umount", ["-l", target]);
    for (const device of this.loops.reverse()) await run("losetup", ["-d", device]);
    this.mounts.length = 0;
    this.loops.length = 0;
  }
}

export class FuseFixture extends LoopsAndMounts {
  readonly source = new StaticExportSource();
  private server: FuseServer | undefined;
  private readonly backends: FileBackend[] = [];

  /** A mounted fixture, or undefined after t.skip() with the reason. Cleanup is registered on `t`. */
  static async create(
    t: TestContext,
    tools: readonly string[],
    readerThreads?: number,
  ): Promise<FuseFixture | undefined> {
    const reason = await skipReason(tools);
    if (reason) {
      t.skip(reason);
      return undefined;
    }
    const fixture = new FuseFixture(await mkdtemp(join(tmpdir(), "blocksnap-fuse-")));
    t.after(() => fixture.cleanup());
    fixture.server = await FuseServer.mount(fixture.source, {
      mountDir: fixture.mountDir,
      ...(readerThreads === undefined ? {} : { readerThreads }),
    });
    return fixture;
  }

  get fuseServer(): FuseServer {
    if (!this.server) throw new Error("not mounted");
    return this.server;
  }

  /** Adds an export over a sparse file in the temp dir; returns the backend for direct comparison. */
  addFileExport(name: string, sizeBytes: number): FileBackend {
    const backend = FileBackend.open(join(this.directory, `${name.replace(/[^A-Za-z0-9._-]/g, "_")}.img`), {
      sizeBytes,
    });
    this.backends.push(backend);
    this.addExport(name, backend);
    return backend;
  }

  addMemoryExport(name: string, sizeBytes: number, readOnly = false): MemoryBackend {
    const backend = new MemoryBackend(sizeBytes);
    this.addExport(name, backend, readOnly);
    return backend;
  }

  addExport(name: string, device: BlockDevice, readOnly = false): Export {
    const entry: Export = {
      name,
      description: `test export ${name}`,
      device: new CheckedDevice(device, { readOnly }),
      readOnly,
    };
    this.source.add(entry);
    return entry;
  }

  async cleanup(): Promise<void> {
    await this.releaseLoopsAndMounts();
    await this.server?.unmount();
    for (const backend of this.backends) await backend.close();
    await rm(this.directory, { recursive: true, force: true });
  }
}

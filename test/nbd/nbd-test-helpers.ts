/**
 * Helpers for the NBD integration tests: an in-process NbdServer on a private Unix socket, exports over
 * MemoryBackend / FileBackend, and asynchronous runners for the real clients. The server shares the test's
 * event loop, so clients are only ever spawned asynchronously (a spawnSync would deadlock the server).
 */
import { spawn } from "node:child_process";
import * as fs from "node:fs";
import { mkdtemp, rm } from "node:fs/promises";
import { tmpdir } from "node:os";
import { dirname, join, resolve } from "node:path";
import { fileURLToPath } from "node:url";
import { FileBackend } from "../../src/backends/file-backend.js";
import { MemoryBackend } from "../../src/backends/memory-backend.js";
import { CheckedDevice } from "../../src/block/checked-device.js";
import type { BlockDevice } from "../../src/block/device.js";
import type { Export } from "../../src/block/export-source.js";
import { StaticExportSource } from "../../src/block/export-source.js";
import type { NbdServerOptions } from "../../src/nbd/nbd-server.js";
import { NbdServer } from "../../src/nbd/nbd-server.js";
import { run, which } from "../helpers/commands.js";

export const libnbdPython = "/usr/bin/python3";

export interface TestServer {
  readonly server: NbdServer;
  readonly source: StaticExportSource;
  readonly directory: string;
  readonly socketPath: string;
  uri(exportName: string): string;
  close(): Promise<void>;
}

export async function startTestServer(
  exports: readonly Export[],
  options: NbdServerOptions = {},
): Promise<TestServer> {
  const directory = await mkdtemp(join(tmpdir(), "blocksnap-nbd-"));
  const socketPath = join(directory, "nbd.sock");
  const source = new StaticExportSource(exports);
  const server = new NbdServer(source, options);
  await server.listenUnix(socketPath);
  return {
    server,
    source,
    directory,
    socketPath,
    uri: (exportName) => `nbd+unix:///${encodeURIComponent(exportName)}?socket=${socketPath}`,
    close: async () => {
      await server.close();
      await rm(directory, { recursive: true, force: true });
    },
  };
}

export function deviceExport(name: string, device: BlockDevice, readOnly = false, description = ""): Export {
  return { name, description, device: new CheckedDevice(device, { readOnly }), readOnly };
}

export function memoryExport(name: string, sizeBytes: number, readOnly = false): Export {
  return deviceExport(name, new MemoryBackend(sizeBytes), readOnly, `memory export ${name}`);
}

export function fileExport(
  name: string,
  path: string,
  sizeBytes: number,
): { entry: Export; backend: FileBackend } {
  const backend = FileBackend.open(path, { sizeBytes });
  return { entry: deviceExport(name, backend, false, `file export ${name}`), backend };
}

/** True when Debian's python3 has the libnbd bindings (python3-libnbd). */
export async function hasLibnbdPython(): Promise<boolean> {
  if (which(libnbdPython) === undefined) return false;
  const result = await run(libnbdPython, ["-c", "import nbd"]);
  return result.code === 0;
}

/**
 * A file of the source tree (test/nbd/smoke.py...): found relative to this compiled file, or from the
 * working directory when the tests were compiled elsewhere.
 */
export function sourceTreeFile(relativePath: string): string {
  let directory = dirname(fileURLToPath(import.meta.url));
  for (let depth = 0; depth < 6; depth += 1) {
    const candidate = join(directory, relativePath);
    if (fs.existsSync(candidate)) return candidate;
    directory = dirname(directory);
  }
  return resolve(process.cwd(), relativePath);
}

/** Spawns a long-running process (a server for a peer test); resolves once it has exited. */
export function spawnProcess(command: string, args: readonly string[]) {
  const child = spawn(command, args, { stdio: ["ignore", "pipe", "pipe"] });
  const exited = new Promise<number | null>((resolvePromise) =>
    child.on("exit", (code) => resolvePromise(code)),
  );
  return { child, exited };
}

/** Polls a condition on the event loop (no timing assertions: it waits up to timeoutMs, then fails the test). */
export async function waitFor(condition: () => boolean, pollMs = 5, timeoutMs = 60_000): Promise<void> {
  // Bounded: a condition that never comes fails the test with a message instead of hanging it.
  const deadlineMs = Date.now() + timeoutMs;
  while (!condition()) {
    if (Date.now() > deadlineMs) throw new Error(`waitFor: condition not met within ${timeoutMs} ms`);
    await new Promise((resolvePromise) => setTimeout(resolvePromise, pollMs));
  }
}

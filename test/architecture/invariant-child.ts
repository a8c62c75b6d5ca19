// A face in its own process whose device (or engine) breaks an invariant, for the test that proves a broken
// invariant ends the process. Usage: node invariant-child.js nbd|fuse|control PATH — serves an NBD Unix
// socket, a FUSE mount directory or a control socket at PATH, prints "ready", logs JSON lines to stderr.
// Device reads at or beyond 64 KiB fail an assertion; the control engine asserts on listDevices().
import { MemoryBackend } from "../../src/backends/memory-backend.js";
import { CheckedDevice } from "../../src/block/checked-device.js";
import type { BlockDevice } from "../../src/block/device.js";
import { StaticExportSource } from "../../src/block/export-source.js";
import type { ControlEngine } from "../../src/daemon/control-engine.js";
import { ControlServer } from "../../src/daemon/control-server.js";
import { FuseServer } from "../../src/fuse/fuse-server.js";
import { NbdServer } from "../../src/nbd/nbd-server.js";
import { assert } from "../../src/util/assert.js";
import type { LogFn, Logger } from "../../src/util/logger.js";

export const brokenOffsetBytes = 64 * 1024;

const [face, path] = process.argv.slice(2);
if (!face || !path) throw new Error("usage: invariant-child nbd|fuse|control PATH");

const logAt =
  (level: string): LogFn =>
  (fieldsOrMessage: object | string, message?: string) => {
    const fields = typeof fieldsOrMessage === "string" ? {} : fieldsOrMessage;
    const msg = typeof fieldsOrMessage === "string" ? fieldsOrMessage : message;
    process.stderr.write(`${JSON.stringify({ level, ...fields, msg })}\n`);
  };
const logger: Logger = { debug: () => {}, info: logAt("info"), warn: logAt("warn"), error: logAt("error") };

function brokenDevice(): BlockDevice {
  const backend = new MemoryBackend(1024 * 1024);
  return {
    sizeBytes: backend.sizeBytes,
    capabilities: backend.capabilities,
    read: async (offsetBytes, target) => {
      assert(offsetBytes < brokenOffsetBytes, "test invariant: no read beyond 64 KiB");
      return backend.read(offsetBytes, target);
    },
    write: (offsetBytes, source, flags) => backend.write(offsetBytes, source, flags),
    writeZeroes: (offsetBytes, lengthBytes, flags) => backend.writeZeroes(offsetBytes, lengthBytes, flags),
    trim: (offsetBytes, lengthBytes) => backend.trim(offsetBytes, lengthBytes),
    flush: () => backend.flush(),
  };
}

const source = new StaticExportSource([
  {
    name: "disk",
    description: "asserting export",
    device: new CheckedDevice(brokenDevice()),
    readOnly: false,
  },
]);

if (face === "nbd") {
  const server = new NbdServer(source, { logger });
  await server.listenUnix(path);
} else if (face === "fuse") {
  await FuseServer.mount(source, { mountDir: path, logger });
} else if (face === "control") {
  const engine = {
    listDevices: () => {
      assert(false, "test invariant: the device list is broken");
    },
  } as unknown as ControlEngine;
  await ControlServer.listen({
    socketPath: path,
    logger,
    context: {
      engine,
      registry: {
        add: () => Promise.reject(new Error("not used")),
        remove: async () => {},
        unavailable: () => [],
        cbtRecoveries: () => ({}),
      },
      identity: {
        pid: process.pid,
        version: "test",
        stateDir: "/",
        controlSocket: path,
        access: { socketMode: "0600", socketGroup: null, whoCanConnect: [] },
      },
      addresses: { nbdSocketPath: null, nbdTcp: null, fuseMountDir: null },
      shutdownSignal: new AbortController().signal,
    },
  });
} else {
  throw new Error(`unknown face ${face}`);
}
process.stdout.write("ready\n");

// A FUSE server in its own process, for tests that must crash one (stale-mount recovery).
// Usage: node fuse-child-server.js MOUNT_DIR NAME:SIZE_BYTES...  — prints "ready" once mounted, unmounts on
// SIGTERM. Memory-backed exports only.
import { MemoryBackend } from "../../src/backends/memory-backend.js";
import { CheckedDevice } from "../../src/block/checked-device.js";
import { StaticExportSource } from "../../src/block/export-source.js";
import { FuseServer } from "../../src/fuse/fuse-server.js";

const [mountDir, ...specs] = process.argv.slice(2);
if (!mountDir) throw new Error("usage: fuse-child-server MOUNT_DIR NAME:SIZE_BYTES...");
const source = new StaticExportSource(
  specs.map((spec) => {
    const [name, size] = spec.split(":");
    const device = new CheckedDevice(new MemoryBackend(Number(size)));
    return { name: name ?? "disk", description: "child export", device, readOnly: false };
  }),
);
const server = await FuseServer.mount(source, { mountDir });
process.on("SIGTERM", () => {
  server.unmount().then(() => process.exit(0));
});
process.stdout.write("ready\n");

// The blocksnap FUSE server alone in its own process, for benchmarks (the load generator must not share
// its event loop). Usage: node fuse-bench-server.js MOUNT_DIR NAME BACKING_FILE
// Prints "ready" once mounted; unmounts and exits on SIGTERM or SIGINT.
import { FileBackend } from "../../src/backends/file-backend.js";
import { CheckedDevice } from "../../src/block/checked-device.js";
import { StaticExportSource } from "../../src/block/export-source.js";
import { FuseServer } from "../../src/fuse/fuse-server.js";

const [mountDir, name, backingPath] = process.argv.slice(2);
if (!mountDir || !name || !backingPath)
  throw new Error("usage: fuse-bench-server MOUNT_DIR NAME BACKING_FILE");
const backend = FileBackend.open(backingPath);
const source = new StaticExportSource([
  { name, description: `bench ${backingPath}`, device: new CheckedDevice(backend), readOnly: false },
]);
const server = await FuseServer.mount(source, { mountDir });
const stop = () => {
  server
    .unmount()
    .then(() => backend.close())
    .then(() => process.exit(0));
};
process.on("SIGTERM", stop);
process.on("SIGINT", stop);
process.stdout.write("ready\n");

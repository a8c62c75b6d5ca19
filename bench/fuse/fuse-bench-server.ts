// The blocksnap FUSE server alone in its own process, for benchmarks (the load generator must not share
// its event loop). It serves the real stack, like bench/nbd/bench-server.ts does over NBD: Engine →
// Tracker (CBT + copy-before-write) → CheckedDevice → FUSE, with BACKING_FILE as origin device NAME.
// Usage: node fuse-bench-server.js MOUNT_DIR NAME BACKING_FILE [READER_THREADS]
// Prints "ready" once mounted; unmounts and exits on SIGTERM or SIGINT.
import { Engine } from "../../src/engine/engine.js";
import { FuseServer } from "../../src/fuse/fuse-server.js";

const [mountDir, name, backingPath, readerThreads] = process.argv.slice(2);
if (!mountDir || !name || !backingPath)
  throw new Error("usage: fuse-bench-server MOUNT_DIR NAME BACKING_FILE");
const engine = new Engine();
await engine.addDevice({ name, backendPath: backingPath });
const server = await FuseServer.mount(engine, {
  mountDir,
  ...(readerThreads === undefined ? {} : { readerThreads: Number(readerThreads) }),
});
const stop = () => {
  server
    .unmount()
    .then(() => engine.close())
    .then(() => process.exit(0));
};
process.on("SIGTERM", stop);
process.on("SIGINT", stop);
process.stdout.write("ready\n");

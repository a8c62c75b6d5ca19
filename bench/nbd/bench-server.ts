/**
 * The benchmark's blocksnap NBD server, in its own process so that it does not share an event loop with
 * the clients. It runs the real stack: Engine → Tracker (CBT + copy-before-write) → CheckedDevice → NBD,
 * with FILE as origin device "disk". With `--snapshot DIR` it also takes a snapshot (64 KiB chunks,
 * difference storage in a temp file in DIR) and serves its image "disk@<id>".
 * Usage: node dist/bench/nbd/bench-server.js FILE SOCKET [--snapshot DIR]
 * Prints "ready <image export name or ->" once listening; SIGTERM stops it.
 */
import { Engine } from "../../src/engine/engine.js";
import { NbdServer } from "../../src/nbd/nbd-server.js";

const [filePath, socketPath, flag, storageDirectory] = process.argv.slice(2);
if (filePath === undefined || socketPath === undefined || (flag !== undefined && flag !== "--snapshot")) {
  console.error("usage: bench-server FILE SOCKET [--snapshot DIR]");
  process.exit(2);
}
const engine = new Engine();
await engine.addDevice({ name: "disk", backendPath: filePath });
let imageName = "-";
if (flag === "--snapshot" && storageDirectory !== undefined) {
  const { id } = await engine.createSnapshot({
    storage: storageDirectory,
    limitBytes: 64 * 2 ** 30,
    chunkSizeBytes: 64 * 1024,
    devices: ["disk"],
  });
  await engine.takeSnapshot(id);
  imageName = `disk@${id}`;
}
const server = new NbdServer(engine);
await server.listenUnix(socketPath);
console.log(`ready ${imageName}`);
const stop = () => {
  server
    .close()
    .then(() => engine.close())
    .then(() => process.exit(0));
};
process.on("SIGTERM", stop);
process.on("SIGINT", stop);

/**
 * The benchmark's blocksnap NBD server, in its own process so that it does not share an event loop with
 * the clients: serves one file (FileBackend, read-write) as the default export "" on a Unix socket.
 * Usage: node dist/bench/nbd/bench-server.js FILE SOCKET. Prints "ready" once listening; SIGTERM stops it.
 */
import { FileBackend } from "../../src/backends/file-backend.js";
import { CheckedDevice } from "../../src/block/checked-device.js";
import { StaticExportSource } from "../../src/block/export-source.js";
import { NbdServer } from "../../src/nbd/nbd-server.js";

const [filePath, socketPath] = process.argv.slice(2);
if (filePath === undefined || socketPath === undefined) {
  console.error("usage: bench-server FILE SOCKET");
  process.exit(2);
}
const backend = FileBackend.open(filePath);
const source = new StaticExportSource([
  { name: "", description: "bench", device: new CheckedDevice(backend), readOnly: false },
]);
const server = new NbdServer(source);
await server.listenUnix(socketPath);
console.log("ready");
const stop = () => {
  server
    .close()
    .then(() => backend.close())
    .then(() => process.exit(0));
};
process.on("SIGTERM", stop);
process.on("SIGINT", stop);

/**
 * A tiny NBD server for the socket-activation test: run by `nbdinfo -- [ node THIS ]`, it serves a 1 MiB
 * memory export named "" (libnbd's default) on the listening socket systemd-style activation passes as fd 3,
 * after checking LISTEN_PID / LISTEN_FDS as systemd's sd_listen_fds() does.
 */
import { MemoryBackend } from "../../src/backends/memory-backend.js";
import { CheckedDevice } from "../../src/block/checked-device.js";
import { StaticExportSource } from "../../src/block/export-source.js";
import { NbdServer } from "../../src/nbd/nbd-server.js";

const listenFdsStart = 3;
if (process.env.LISTEN_PID !== String(process.pid) || process.env.LISTEN_FDS !== "1") {
  console.error("socket-activation-server: no LISTEN_PID/LISTEN_FDS for this process");
  process.exit(2);
}
const device = new CheckedDevice(new MemoryBackend(1024 * 1024));
const server = new NbdServer(
  new StaticExportSource([{ name: "", description: "activated", device, readOnly: false }]),
);
await server.listenFd(listenFdsStart);
const stop = () => {
  server.close().then(() => process.exit(0));
};
process.on("SIGTERM", stop);
process.on("SIGINT", stop);

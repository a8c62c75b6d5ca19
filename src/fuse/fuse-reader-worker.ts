/**
 * The /dev/fuse reader thread. A read of /dev/fuse blocks until the kernel has a request; done on the main
 * thread it would stall the event loop, done through the libuv pool it would hold a pool thread forever.
 * So one worker thread loops: take a free slot of the shared buffer, read(2) one request into it, post
 * "slot N holds L bytes" to the main thread, which serves the request and frees the slot.
 *
 * Slot states live in a shared Int32Array (FuseReaderControl): 0 free, 1 owned by a request. When every
 * slot is taken the worker sleeps on the release counter (Atomics.wait); this bounds the requests in
 * flight, and the kernel keeps the rest queued. It ends when the connection is gone (ENODEV: unmounted or
 * aborted) or when asked to stop, and never touches the file system itself. It may start before mount(2)
 * has attached the descriptor (reads fail with EPERM until then) and polls until it has.
 */
import { readSync } from "node:fs";
import { parentPort, workerData } from "node:worker_threads";
import { type FuseReaderMessage, type FuseReaderWorkerData, readerControl } from "./fuse-reader-protocol.js";

const notMountedPollMs = 2;

function main(): void {
  const port = parentPort;
  if (!port) throw new Error("fuse-reader-worker must run as a worker thread");
  const data = workerData as FuseReaderWorkerData;
  const control = new Int32Array(data.control);
  const slots: Uint8Array[] = [];
  for (let index = 0; index < data.slotCount; index += 1) {
    slots.push(new Uint8Array(data.slots, index * data.slotBytes, data.slotBytes));
  }
  const post = (message: FuseReaderMessage) => port.postMessage(message);
  let next = 0;
  let mounted = false;
  for (;;) {
    const slot = acquireSlot(control, data.slotCount, next);
    if (slot < 0) break;
    next = (slot + 1) % data.slotCount;
    let lengthBytes: number;
    try {
      lengthBytes = readSync(data.fd, slots[slot]!, 0, data.slotBytes, null);
    } catch (error) {
      releaseSlot(control, slot);
      const code = (error as NodeJS.ErrnoException).code ?? "EIO";
      // ENOENT: the request was interrupted before we read it; EINTR/EAGAIN: try again.
      if (code === "ENOENT" || code === "EINTR" || code === "EAGAIN") continue;
      // EPERM until mount(2) has attached the descriptor to a connection: we start before mount runs.
      if (code === "EPERM" && !mounted) {
        Atomics.wait(control, readerControl.stop, 0, notMountedPollMs);
        continue;
      }
      if (code === "ENODEV") post({ kind: "closed" });
      else post({ kind: "failed", code, message: String(error) });
      break;
    }
    mounted = true;
    post({ kind: "request", slot, lengthBytes });
  }
}

/** A free slot, marked busy; -1 when asked to stop. Sleeps while every slot is busy. */
function acquireSlot(control: Int32Array, slotCount: number, start: number): number {
  for (;;) {
    if (Atomics.load(control, readerControl.stop) !== 0) return -1;
    const generation = Atomics.load(control, readerControl.releases);
    for (let step = 0; step < slotCount; step += 1) {
      const slot = (start + step) % slotCount;
      if (Atomics.compareExchange(control, readerControl.firstSlot + slot, 0, 1) === 0) return slot;
    }
    Atomics.wait(control, readerControl.releases, generation);
  }
}

function releaseSlot(control: Int32Array, slot: number): void {
  Atomics.store(control, readerControl.firstSlot + slot, 0);
  Atomics.add(control, readerControl.releases, 1);
}

main();

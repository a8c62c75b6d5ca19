/**
 * The thread of one FileSystemWriter: sleeps on the doorbell (Atomics.wait, no event loop), runs each
 * submitted batch's writes and extensions in order with the synchronous fs calls (a blocked call here, on a
 * frozen or dying file system, blocks only this thread), stores every operation's outcome as soon as it is
 * done, and notifies every few operations; a notify wakes the event loop only when it waits
 * (fs-write-protocol.ts).
 * Errors never end the thread; the writer ends it with terminate(), which also interrupts the wait.
 */
import * as fs from "node:fs";
import { type MessagePort, parentPort, receiveMessageOnPort, workerData } from "node:worker_threads";
import { assert } from "../util/assert.js";
import {
  BUFFER_STAGING,
  DOORBELL_DONE_OPS,
  DOORBELL_SUBMITTED,
  doorbellSlotBase,
  notifyEveryOps,
  OP_EXTEND,
  OP_WRITE,
  OP_ZERO,
  opFields,
  slotCount,
  type WriterMessage,
  type WriterShared,
} from "./fs-write-protocol.js";

const zeroBufferBytes = 1024 * 1024;
/** Node's errno of EIO, for a failure that carries none. */
const errnoEio = -5;
let zeroes: Uint8Array | undefined;

assert(parentPort, "fs-writer-worker runs as a worker thread");
const port: MessagePort = parentPort;
const shared = workerData as WriterShared;
const doorbell = new Int32Array(shared.doorbell);
const opTables = shared.opTables.map((buffer) => new Float64Array(buffer));
const resultTables = shared.resultTables.map((buffer) => new Int32Array(buffer));
const stagings = shared.stagingBuffers.map((buffer) => new Uint8Array(buffer));
/** Buffers written from by reference, by id (SharedRegistered / SharedReleased). */
const sharedBuffers = new Map<number, Uint8Array>();
const pauseBeforeNotifyNs = BigInt(Math.round(shared.pauseBeforeNotifyMicros * 1000));

/** Tests only (WriterShared.pauseBeforeNotifyMicros). */
function pauseBeforeNotify(): void {
  const startNs = process.hrtime.bigint();
  while (process.hrtime.bigint() - startNs < pauseBeforeNotifyNs);
}

function runOne(ops: Float64Array, base: number, data: Uint8Array): void {
  const kind = ops[base];
  const fd = ops[base + 1] ?? -1;
  const positionBytes = ops[base + 2] ?? 0;
  const dataOffsetBytes = ops[base + 3] ?? 0;
  const lengthBytes = ops[base + 4] ?? 0;
  if (kind === OP_EXTEND) {
    fs.ftruncateSync(fd, positionBytes);
    return;
  }
  if (kind === OP_ZERO) {
    zeroes ??= new Uint8Array(zeroBufferBytes);
    for (let doneBytes = 0; doneBytes < lengthBytes; doneBytes += zeroBufferBytes) {
      writeAll(fd, zeroes, 0, Math.min(zeroBufferBytes, lengthBytes - doneBytes), positionBytes + doneBytes);
    }
    return;
  }
  assert(kind === OP_WRITE, "unknown operation in a write batch");
  const bufferId = ops[base + 5] ?? BUFFER_STAGING;
  const source = bufferId === BUFFER_STAGING ? data : sharedBuffers.get(bufferId);
  assert(source, "a write from a registered buffer");
  writeAll(fd, source, dataOffsetBytes, lengthBytes, positionBytes);
}

function writeAll(
  fd: number,
  source: Uint8Array,
  offsetBytes: number,
  lengthBytes: number,
  positionBytes: number,
): void {
  let doneBytes = 0;
  while (doneBytes < lengthBytes) {
    const written = fs.writeSync(
      fd,
      source,
      offsetBytes + doneBytes,
      lengthBytes - doneBytes,
      positionBytes + doneBytes,
    );
    assert(written > 0, "a write wrote nothing");
    doneBytes += written;
  }
}

/**
 * Messages the writer posted before the batch about to run: replaced staging buffers, shared buffers
 * registered or released.
 */
function takeMessages(): void {
  for (;;) {
    const received = receiveMessageOnPort(port);
    if (!received) return;
    const message = received.message as WriterMessage;
    switch (message.type) {
      case "staging":
        stagings[message.slot] = new Uint8Array(message.staging);
        break;
      case "register":
        sharedBuffers.set(message.id, new Uint8Array(message.buffer));
        break;
      case "release":
        sharedBuffers.delete(message.id);
        break;
    }
  }
}

function runBatch(slot: number): void {
  const ops = opTables[slot];
  const results = resultTables[slot];
  const data = stagings[slot];
  assert(ops && results && data, "a batch in a slot that exists");
  const count = doorbell[doorbellSlotBase + slot] ?? 0;
  for (let index = 0; index < count; index++) {
    try {
      runOne(ops, index * opFields, data);
      results[index] = 0;
    } catch (error) {
      const errno = (error as NodeJS.ErrnoException).errno;
      results[index] = typeof errno === "number" && errno < 0 ? errno : errnoEio;
    }
    // The outcome is stored before the count that publishes it (both seen by the loop in this order).
    Atomics.add(doorbell, DOORBELL_DONE_OPS, 1);
    const isNotifyPoint = index + 1 === count || (index + 1) % notifyEveryOps === 0;
    if (!isNotifyPoint) continue;
    if (pauseBeforeNotifyNs > 0n) pauseBeforeNotify();
    // Unconditional (fs-write-protocol.ts): it wakes the event loop only if it waits.
    Atomics.notify(doorbell, DOORBELL_DONE_OPS);
  }
}

let completed = 0;
for (;;) {
  if (Atomics.load(doorbell, DOORBELL_SUBMITTED) === completed) {
    Atomics.wait(doorbell, DOORBELL_SUBMITTED, completed);
    continue;
  }
  takeMessages();
  runBatch(completed % slotCount);
  completed++;
}

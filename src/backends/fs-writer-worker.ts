/**
 * The thread of one FileSystemWriter: runs each batch's writes and extensions in order with the
 * synchronous fs calls (a blocked call here, on a frozen or dying file system, blocks only this thread),
 * then answers with the failures. Errors never end the thread.
 */
import * as fs from "node:fs";
import { parentPort } from "node:worker_threads";
import { assert } from "../util/assert.js";
import {
  type BatchFailure,
  type BatchReply,
  OP_EXTEND,
  OP_WRITE,
  OP_ZERO,
  opFields,
  type WriteBatch,
} from "./fs-write-protocol.js";

const zeroBufferBytes = 1024 * 1024;
let zeroes: Uint8Array | undefined;

const port = parentPort;
assert(port, "fs-writer-worker runs as a worker thread");

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
  writeAll(fd, data, dataOffsetBytes, lengthBytes, positionBytes);
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

port.on("message", (batch: WriteBatch) => {
  const data = new Uint8Array(batch.data);
  const failures: BatchFailure[] = [];
  const count = batch.ops.length / opFields;
  for (let index = 0; index < count; index++) {
    try {
      runOne(batch.ops, index * opFields, data);
    } catch (error) {
      const { code, message } = error as NodeJS.ErrnoException;
      failures.push({ index, code: code ?? "EIO", message });
    }
  }
  const reply: BatchReply = { batchId: batch.batchId, failures };
  port.postMessage(reply);
});

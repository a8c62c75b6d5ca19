/**
 * Codec worker thread: runs ChunkCodec (hashing, zstd, AES-GCM, CRC) for codec-pool.ts so that the daemon's
 * event loop keeps serving devices during a backup or restore. One request at a time, in arrival order;
 * errors go back as {errno, message} and never end the thread.
 */
import { parentPort, workerData } from "node:worker_threads";
import { BlockError } from "../block/errors.js";
import { ChunkCodec, isAllZero } from "./chunk-codec.js";
import type { CodecRequest, CodecResponse, CodecWorkerData } from "./codec-protocol.js";

const data = workerData as CodecWorkerData;
const codec = new ChunkCodec(data.keys, data.plainLengthMax);
const zeroIds = new Map<number, string>();

function zeroIdOf(lengthBytes: number): string {
  let id = zeroIds.get(lengthBytes);
  if (id === undefined) {
    id = codec.idOf(new Uint8Array(lengthBytes));
    zeroIds.set(lengthBytes, id);
  }
  return id;
}

function handle(request: CodecRequest): { response: CodecResponse; transfer: ArrayBuffer[] } {
  switch (request.op) {
    case "encode": {
      if (isAllZero(request.plain))
        return {
          response: { seq: request.seq, ok: true, id: zeroIdOf(request.plain.length), stored: null },
          transfer: [],
        };
      const stored = codec.encode(request.plain);
      return {
        response: { seq: request.seq, ok: true, id: codec.idOf(request.plain), stored },
        transfer: transferable(stored),
      };
    }
    case "encodeInto": {
      const zero = isAllZero(request.plain);
      return {
        response: {
          seq: request.seq,
          ok: true,
          id: zero ? zeroIdOf(request.plain.length) : codec.idOf(request.plain),
          storedLength: zero ? null : codec.encodeInto(request.plain, request.out),
        },
        transfer: [],
      };
    }
    case "decodeInto": {
      const plainLength = codec.decodeInto(request.stored, request.out, request.name, request.expectedId);
      return { response: { seq: request.seq, ok: true, plainLength }, transfer: [] };
    }
    case "decode": {
      const plain = codec.decode(request.stored, request.name, request.expectedId);
      return { response: { seq: request.seq, ok: true, plain }, transfer: transferable(plain) };
    }
    case "check": {
      codec.checkStored(request.stored, request.name);
      return { response: { seq: request.seq, ok: true }, transfer: [] };
    }
    case "zeroId":
      return { response: { seq: request.seq, ok: true, id: zeroIdOf(request.lengthBytes) }, transfer: [] };
  }
}

function transferable(buffer: Uint8Array): ArrayBuffer[] {
  const backing = buffer.buffer;
  return backing instanceof ArrayBuffer && buffer.byteOffset === 0 && buffer.byteLength === backing.byteLength
    ? [backing]
    : [];
}

parentPort?.on("message", (request: CodecRequest) => {
  try {
    const { response, transfer } = handle(request);
    parentPort?.postMessage(response, transfer);
  } catch (error) {
    const errno = error instanceof BlockError ? error.errno : "EIO";
    const message = error instanceof Error ? error.message : String(error);
    parentPort?.postMessage({ seq: request.seq, ok: false, errno, message } satisfies CodecResponse);
  }
});

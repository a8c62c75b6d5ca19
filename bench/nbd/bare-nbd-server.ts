/**
 * A bare NBD server written only to bound what Node can do (bench/nbd/node-limit-probe.ts races it against
 * nbdkit and blocksnap's full stack). Never imported by src/. It serves one file, any export name, with the
 * fixed newstyle handshake (NBD_OPT_GO / NBD_OPT_INFO / NBD_OPT_EXPORT_NAME; every other option is
 * answered NBD_REP_ERR_UNSUP, so clients fall back to simple replies), and READ, WRITE, FLUSH and DISC.
 * No engine, no checks beyond bounds, no structured replies, no TLS: what is left is the cost of the
 * event loop, the socket and the file system calls. Replies completed in one tick leave in one writev
 * (cork, uncork on the next tick), as blocksnap's do, so that the bound is not set by a naive writer.
 *
 * Shapes:
 * - `--shape loop`: one event loop (the process's main thread) serves every connection.
 * - `--shape workers --workers N`: N worker threads, each with its own event loop. Worker 0 listens on the
 *   Unix socket and hands the listening descriptor to the others, which call `server.listen({ fd })` on it
 *   (descriptors are per process, so every worker's loop polls the same listening socket and the kernel
 *   gives each accepted connection to one of them). A connection stays on the worker that accepted it;
 *   which worker that is depends on whose loop wakes first, so connections may pile up on one worker.
 * - `--shape dispatch --workers N`: the main thread accepts (paused, never reading) and hands each accepted
 *   descriptor round-robin to a worker, which opens it with `new net.Socket({ fd })`. The main thread keeps
 *   its paused socket object and never closes it: the worker's socket owns and closes the descriptor, and
 *   a second close by the main thread could hit a reused number (a probe's shortcut: it leaks one small
 *   object per connection; a real dispatcher would need a way to release a handle without closing it).
 * - `--in-place` (shapes loop and dispatch): the connection's socket is opened on the accepted descriptor
 *   with `onread`, whose buffer function hands libuv the rest of a WRITE's payload buffer, so the payload
 *   is received straight into the buffer fs.write takes (no assembly copy; headers go through a scratch
 *   buffer and are copied out).
 * - `--sync`: the file is read and written with fs.readSync / fs.writeSync on the loop itself (blocking, as
 *   nbdkit's threads do) instead of fs.read / fs.write through the libuv thread pool.
 *
 * Usage: node dist/bench/nbd/bare-nbd-server.js FILE SOCKET [--shape loop|workers|dispatch] [--workers N] [--sync] [--in-place]
 * Prints "ready" once every loop listens; SIGTERM stops it.
 */
import * as fs from "node:fs";
import * as net from "node:net";
import { isMainThread, parentPort, Worker, workerData } from "node:worker_threads";

const NBDMAGIC = 0x4e42444d41474943n;
const IHAVEOPT = 0x49484156454f5054n;
const NBD_REP_MAGIC = 0x3e889045565a9n;
const NBD_REQUEST_MAGIC = 0x25609513;
const NBD_SIMPLE_REPLY_MAGIC = 0x67446698;
const NBD_FLAG_FIXED_NEWSTYLE = 1;
const NBD_FLAG_NO_ZEROES = 2;
const NBD_FLAG_C_NO_ZEROES = 2;
const NBD_FLAG_HAS_FLAGS = 1;
const NBD_FLAG_SEND_FLUSH = 1 << 2;
const NBD_FLAG_CAN_MULTI_CONN = 1 << 8;
const NBD_OPT_EXPORT_NAME = 1;
const NBD_OPT_ABORT = 2;
const NBD_OPT_INFO = 6;
const NBD_OPT_GO = 7;
const NBD_REP_ACK = 1;
const NBD_REP_INFO = 3;
const NBD_REP_ERR_UNSUP = 2 ** 31 + 1;
const NBD_INFO_EXPORT = 0;
const NBD_CMD_READ = 0;
const NBD_CMD_WRITE = 1;
const NBD_CMD_DISC = 2;
const NBD_CMD_FLUSH = 3;
const EIO = 5;
const EINVAL = 22;
const MAX_REQUEST_BYTES = 32 * 1024 * 1024;
const TRANSMISSION_FLAGS = NBD_FLAG_HAS_FLAGS | NBD_FLAG_SEND_FLUSH | NBD_FLAG_CAN_MULTI_CONN;

interface ServeOptions {
  readonly fileFd: number;
  readonly sizeBytes: number;
  readonly sync: boolean;
}

/** Bytes received and not parsed yet, as the socket delivered them. */
class ReceiveQueue {
  private chunks: Buffer[] = [];
  length = 0;

  push(chunk: Buffer): void {
    this.chunks.push(chunk);
    this.length += chunk.length;
  }

  /** The next `count` bytes (a view when they lie in one chunk, else a copy); the caller checked length. */
  take(count: number): Buffer {
    if (count === 0) return Buffer.alloc(0);
    const first = this.chunks[0]!;
    this.length -= count;
    if (first.length > count) {
      this.chunks[0] = first.subarray(count);
      return first.subarray(0, count);
    }
    if (first.length === count) {
      this.chunks.shift();
      return first;
    }
    const out = Buffer.allocUnsafe(count);
    let filled = 0;
    while (filled < count) {
      const chunk = this.chunks[0]!;
      const part = Math.min(chunk.length, count - filled);
      chunk.copy(out, filled, 0, part);
      filled += part;
      if (part === chunk.length) this.chunks.shift();
      else this.chunks[0] = chunk.subarray(part);
    }
    return out;
  }
}

function optionReply(option: number, type: number, data: Buffer = Buffer.alloc(0)): Buffer {
  const header = Buffer.allocUnsafe(20);
  header.writeBigUInt64BE(NBD_REP_MAGIC, 0);
  header.writeUInt32BE(option, 8);
  header.writeUInt32BE(type, 12);
  header.writeUInt32BE(data.length, 16);
  return Buffer.concat([header, data]);
}

function simpleReplyHeader(target: Buffer, error: number, handle: Buffer): void {
  target.writeUInt32BE(NBD_SIMPLE_REPLY_MAGIC, 0);
  target.writeUInt32BE(error, 4);
  handle.copy(target, 8);
}

/** What a socket opened with `onread` asks of its connection: where to read next, and what arrived. */
interface InPlaceReceiver {
  nextBuffer(): Uint8Array;
  received(count: number, buffer: Uint8Array): void;
}

const SCRATCH_BYTES = 64 * 1024;

function serveConnection(socket: net.Socket, options: ServeOptions, inPlace = false): InPlaceReceiver {
  const queue = new ReceiveQueue();
  let phase: "flags" | "options" | "transmission" = "flags";
  let noZeroes = false;
  socket.setNoDelay(true);
  socket.on("error", () => socket.destroy());
  const hello = Buffer.allocUnsafe(18);
  hello.writeBigUInt64BE(NBDMAGIC, 0);
  hello.writeBigUInt64BE(IHAVEOPT, 8);
  hello.writeUInt16BE(NBD_FLAG_FIXED_NEWSTYLE | NBD_FLAG_NO_ZEROES, 16);
  socket.write(hello);

  // Replies that complete in the same tick leave in one writev (blocksnap's NbdConnection does the same).
  let corked = false;
  const uncork = () => {
    corked = false;
    socket.uncork();
  };
  const send = (message: Buffer) => {
    if (!corked) {
      corked = true;
      socket.cork();
      process.nextTick(uncork);
    }
    socket.write(message);
  };
  const reply = (error: number, handle: Buffer) => {
    const header = Buffer.allocUnsafe(16);
    simpleReplyHeader(header, error, handle);
    send(header);
  };

  const exportInfo = () => {
    const info = Buffer.allocUnsafe(12);
    info.writeUInt16BE(NBD_INFO_EXPORT, 0);
    info.writeBigUInt64BE(BigInt(options.sizeBytes), 2);
    info.writeUInt16BE(TRANSMISSION_FLAGS, 10);
    return info;
  };

  const handleOption = (option: number, _data: Buffer) => {
    if (option === NBD_OPT_EXPORT_NAME) {
      const answer = Buffer.alloc(noZeroes ? 10 : 134);
      answer.writeBigUInt64BE(BigInt(options.sizeBytes), 0);
      answer.writeUInt16BE(TRANSMISSION_FLAGS, 8);
      socket.write(answer);
      phase = "transmission";
    } else if (option === NBD_OPT_GO || option === NBD_OPT_INFO) {
      socket.write(optionReply(option, NBD_REP_INFO, exportInfo()));
      socket.write(optionReply(option, NBD_REP_ACK));
      if (option === NBD_OPT_GO) phase = "transmission";
    } else if (option === NBD_OPT_ABORT) {
      socket.end(optionReply(option, NBD_REP_ACK));
    } else {
      socket.write(optionReply(option, NBD_REP_ERR_UNSUP));
    }
  };

  const handleRead = (handle: Buffer, offsetBytes: number, lengthBytes: number) => {
    const message = Buffer.allocUnsafe(16 + lengthBytes);
    simpleReplyHeader(message, 0, handle);
    if (options.sync) {
      const got = fs.readSync(options.fileFd, message, 16, lengthBytes, offsetBytes);
      if (got < lengthBytes) message.fill(0, 16 + got);
      send(message);
      return;
    }
    fs.read(options.fileFd, message, 16, lengthBytes, offsetBytes, (error, got) => {
      if (error) return reply(EIO, handle);
      if (got < lengthBytes) message.fill(0, 16 + got);
      send(message);
    });
  };

  const handleWrite = (handle: Buffer, offsetBytes: number, payload: Buffer) => {
    if (options.sync) {
      fs.writeSync(options.fileFd, payload, 0, payload.length, offsetBytes);
      return reply(0, handle);
    }
    fs.write(options.fileFd, payload, 0, payload.length, offsetBytes, (error) =>
      reply(error ? EIO : 0, handle),
    );
  };

  // An option whose header is parsed but whose data has not all arrived.
  let optionHeader: Buffer | null = null;
  // A WRITE whose header is parsed but whose payload has not all arrived.
  let pendingWrite: { handle: Buffer; offsetBytes: number; lengthBytes: number; valid: boolean } | null =
    null;

  const parse = () => {
    for (;;) {
      if (phase === "flags") {
        if (queue.length < 4) return;
        noZeroes = (queue.take(4).readUInt32BE(0) & NBD_FLAG_C_NO_ZEROES) !== 0;
        phase = "options";
      } else if (phase === "options") {
        if (optionHeader === null) {
          if (queue.length < 16) return;
          optionHeader = Buffer.from(queue.take(16));
          if (optionHeader.readBigUInt64BE(0) !== IHAVEOPT || optionHeader.readUInt32BE(12) > 65536) {
            socket.destroy();
            return;
          }
        }
        const dataBytes = optionHeader.readUInt32BE(12);
        if (queue.length < dataBytes) return;
        const option = optionHeader.readUInt32BE(8);
        optionHeader = null;
        handleOption(option, queue.take(dataBytes));
      } else if (pendingWrite) {
        if (inPlace && queue.length < pendingWrite.lengthBytes) {
          // Receive the rest of the payload straight into the buffer fs.write will take.
          const payload = Buffer.allocUnsafe(pendingWrite.lengthBytes);
          const filledBytes = queue.length;
          if (filledBytes > 0) queue.take(filledBytes).copy(payload);
          receiving = { payload, filledBytes };
          return;
        }
        if (queue.length < pendingWrite.lengthBytes) return;
        const { handle, offsetBytes, lengthBytes, valid } = pendingWrite;
        pendingWrite = null;
        const payload = queue.take(lengthBytes);
        if (valid) handleWrite(handle, offsetBytes, payload);
        else reply(EINVAL, handle);
      } else {
        if (queue.length < 28) return;
        const request = queue.take(28);
        if (request.readUInt32BE(0) !== NBD_REQUEST_MAGIC) {
          socket.destroy();
          return;
        }
        const type = request.readUInt16BE(6);
        const handle = Buffer.from(request.subarray(8, 16));
        const offsetBytes = Number(request.readBigUInt64BE(16));
        const lengthBytes = request.readUInt32BE(24);
        const valid = lengthBytes <= MAX_REQUEST_BYTES && offsetBytes + lengthBytes <= options.sizeBytes;
        if (type === NBD_CMD_READ) {
          if (valid) handleRead(handle, offsetBytes, lengthBytes);
          else reply(EINVAL, handle);
        } else if (type === NBD_CMD_WRITE) {
          if (lengthBytes > MAX_REQUEST_BYTES) {
            socket.destroy();
            return;
          }
          pendingWrite = { handle, offsetBytes, lengthBytes, valid };
        } else if (type === NBD_CMD_FLUSH) {
          if (options.sync) {
            fs.fdatasyncSync(options.fileFd);
            reply(0, handle);
          } else fs.fdatasync(options.fileFd, (error) => reply(error ? EIO : 0, handle));
        } else if (type === NBD_CMD_DISC) {
          socket.end();
          return;
        } else reply(EINVAL, handle);
      }
    }
  };

  // With `onread`: the payload being received in place, and whether the last buffer handed out was it.
  let receiving: { payload: Buffer; filledBytes: number } | null = null;
  let handedPayload = false;
  const scratch = Buffer.allocUnsafe(SCRATCH_BYTES);
  if (!inPlace)
    socket.on("data", (chunk: Buffer) => {
      queue.push(chunk);
      parse();
    });
  return {
    nextBuffer: () => {
      handedPayload = receiving !== null;
      return receiving ? receiving.payload.subarray(receiving.filledBytes) : scratch;
    },
    received: (count: number, buffer: Uint8Array) => {
      if (handedPayload && receiving && pendingWrite) {
        receiving.filledBytes += count;
        if (receiving.filledBytes < receiving.payload.length) return;
        const { handle, offsetBytes, valid } = pendingWrite;
        const { payload } = receiving;
        pendingWrite = null;
        receiving = null;
        if (valid) handleWrite(handle, offsetBytes, payload);
        else reply(EINVAL, handle);
      } else {
        // The scratch buffer is reused by the next read: keep a copy.
        queue.push(Buffer.from(buffer.subarray(0, count)));
      }
      parse();
    },
  };
}

/**
 * Opens an accepted descriptor on this thread's loop; with `inPlace`, the socket reads into buffers the
 * connection chooses (`onread`), so a WRITE's payload lands in the buffer that fs.write takes.
 */
function openAccepted(fd: number, options: ServeOptions, inPlace: boolean): void {
  if (!inPlace) {
    serveConnection(new net.Socket({ fd, readable: true, writable: true }), options);
    return;
  }
  let receiver: InPlaceReceiver | null = null;
  const early = Buffer.allocUnsafe(SCRATCH_BYTES);
  // `onread` is accepted by the Socket constructor (it is how net.connect passes it on) but missing from
  // the constructor's type in @types/node.
  const socketOptions: net.SocketConstructorOpts & { onread: net.OnReadOpts } = {
    fd,
    readable: true,
    writable: true,
    onread: {
      // Node may ask for the first buffer while the socket is being built, before the receiver exists.
      buffer: () => (receiver ? receiver.nextBuffer() : early),
      // Returning false would pause the socket; it never needs to here.
      callback: (count: number, buffer: Uint8Array) => {
        receiver!.received(count, buffer);
        return true;
      },
    },
  };
  const socket = new net.Socket(socketOptions);
  receiver = serveConnection(socket, options, true);
}

function openFile(path: string, sync: boolean): ServeOptions {
  const fileFd = fs.openSync(path, "r+");
  return { fileFd, sizeBytes: fs.fstatSync(fileFd).size, sync };
}

interface WorkerData {
  readonly filePath: string;
  readonly socketPath: string;
  readonly sync: boolean;
  /** The listening descriptor to share; absent for worker 0, which creates it. */
  readonly listenFd?: number;
  /** Connections arrive as descriptors from the main thread (shape dispatch). */
  readonly dispatched?: boolean;
  /** Open dispatched connections with `onread` (receive WRITE payloads in place). */
  readonly inPlace?: boolean;
}

/** The descriptor under a server's or socket's libuv handle (Node has no public accessor). */
function handleFd(owner: net.Server | net.Socket): number {
  const handle = (owner as unknown as { _handle?: { fd?: number } })._handle;
  if (typeof handle?.fd !== "number" || handle.fd < 0) throw new Error("no descriptor");
  return handle.fd;
}
const listenFd = (server: net.Server) => handleFd(server);
const socketFd = (socket: net.Socket) => handleFd(socket);

async function main(): Promise<void> {
  const argv = process.argv.slice(2);
  const [filePath, socketPath] = argv;
  const flag = (name: string, fallback: string) => {
    const index = argv.indexOf(name);
    return index >= 0 && argv[index + 1] !== undefined ? argv[index + 1]! : fallback;
  };
  const shape = flag("--shape", "loop");
  const workerCount = Number(flag("--workers", "2"));
  const sync = argv.includes("--sync");
  const inPlace = argv.includes("--in-place");
  if (
    filePath === undefined ||
    socketPath === undefined ||
    !["loop", "workers", "dispatch"].includes(shape)
  ) {
    console.error(
      "usage: bare-nbd-server FILE SOCKET [--shape loop|workers|dispatch] [--workers N] [--sync] [--in-place]",
    );
    process.exit(2);
  }
  fs.rmSync(socketPath, { force: true });
  const stoppers: Array<() => Promise<unknown>> = [];
  if (shape === "loop") {
    const options = openFile(filePath, sync);
    // With --in-place, the accepted socket is only a holder (paused, never closed: see dispatch) and the
    // connection is served on a second socket opened on its descriptor with `onread`.
    const held = new Set<net.Socket>();
    const server = inPlace
      ? net.createServer({ pauseOnConnect: true }, (socket) => {
          held.add(socket);
          openAccepted(socketFd(socket), options, true);
        })
      : net.createServer((socket) => serveConnection(socket, options));
    await new Promise<void>((resolve) => server.listen(socketPath, resolve));
    stoppers.push(() => new Promise((resolve) => server.close(resolve)));
  } else if (shape === "workers") {
    const url = new URL(import.meta.url);
    const start = (data: WorkerData) =>
      new Promise<{ worker: Worker; fd: number }>((resolve, reject) => {
        const worker = new Worker(url, { workerData: data });
        worker.once("message", (fd: number) => resolve({ worker, fd }));
        worker.once("error", reject);
      });
    const first = await start({ filePath, socketPath, sync });
    const rest = await Promise.all(
      Array.from({ length: workerCount - 1 }, () =>
        start({ filePath, socketPath, sync, listenFd: first.fd }),
      ),
    );
    for (const { worker } of [first, ...rest]) stoppers.push(() => worker.terminate());
  } else {
    const url = new URL(import.meta.url);
    const workers = await Promise.all(
      Array.from(
        { length: workerCount },
        () =>
          new Promise<Worker>((resolve, reject) => {
            const worker = new Worker(url, {
              workerData: { filePath, socketPath, sync, dispatched: true, inPlace },
            });
            worker.once("message", () => resolve(worker));
            worker.once("error", reject);
          }),
      ),
    );
    const handedOver = new Set<net.Socket>();
    let next = 0;
    const server = net.createServer({ pauseOnConnect: true }, (socket) => {
      handedOver.add(socket);
      workers[next % workers.length]!.postMessage(socketFd(socket));
      next += 1;
    });
    await new Promise<void>((resolve) => server.listen(socketPath, resolve));
    stoppers.push(() => new Promise((resolve) => server.close(resolve)));
    for (const worker of workers) stoppers.push(() => worker.terminate());
  }
  console.log("ready");
  const stop = () => {
    Promise.all(stoppers.map((stopper) => stopper())).then(() => process.exit(0));
  };
  process.on("SIGTERM", stop);
  process.on("SIGINT", stop);
}

async function workerMain(data: WorkerData): Promise<void> {
  const options = openFile(data.filePath, data.sync);
  if (data.dispatched) {
    parentPort!.on("message", (fd: number) => openAccepted(fd, options, data.inPlace === true));
    parentPort!.postMessage(-1);
    return;
  }
  const server = net.createServer((socket) => serveConnection(socket, options));
  const target = data.listenFd === undefined ? data.socketPath : { fd: data.listenFd };
  await new Promise<void>((resolve) => server.listen(target, resolve));
  parentPort!.postMessage(listenFd(server));
}

if (isMainThread) await main();
else await workerMain(workerData as WorkerData);

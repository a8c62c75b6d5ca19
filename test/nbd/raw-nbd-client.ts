/**
 * A raw NBD client over net.Socket for the protocol probes (docs/design/nbd-notes.md): it sends exactly
 * the bytes a test builds, including what libnbd refuses to send, and reads replies field by field.
 * Written for tests only: no pipelining logic, every read waits for an exact byte count.
 */
import * as net from "node:net";

export const IHAVEOPT = 0x49484156454f5054n;
export const OPTION_REPLY_MAGIC = 0x0003e889045565a9n;
export const REQUEST_MAGIC = 0x25609513;
export const SIMPLE_REPLY_MAGIC = 0x67446698;
export const STRUCTURED_REPLY_MAGIC = 0x668e33ef;

export const NBD_OPT = {
  EXPORT_NAME: 1,
  ABORT: 2,
  LIST: 3,
  STARTTLS: 5,
  INFO: 6,
  GO: 7,
  STRUCTURED_REPLY: 8,
  LIST_META_CONTEXT: 9,
  SET_META_CONTEXT: 10,
  EXTENDED_HEADERS: 11,
} as const;
export const NBD_REP = {
  ACK: 1,
  SERVER: 2,
  INFO: 3,
  META_CONTEXT: 4,
  ERR_UNSUP: 0x80000001,
  ERR_INVALID: 0x80000003,
  ERR_UNKNOWN: 0x80000006,
  ERR_SHUTDOWN: 0x80000007,
  ERR_TOO_BIG: 0x80000009,
} as const;
export const NBD_CMD = {
  READ: 0,
  WRITE: 1,
  DISC: 2,
  FLUSH: 3,
  TRIM: 4,
  CACHE: 5,
  WRITE_ZEROES: 6,
  BLOCK_STATUS: 7,
} as const;
export const NBD_CMD_FLAG = { FUA: 1, NO_HOLE: 2, DF: 4, REQ_ONE: 8, FAST_ZERO: 16 } as const;
export const NBD_FLAG = {
  HAS_FLAGS: 1,
  READ_ONLY: 2,
  SEND_FLUSH: 4,
  SEND_FUA: 8,
  SEND_TRIM: 32,
  SEND_WRITE_ZEROES: 64,
  SEND_DF: 128,
  CAN_MULTI_CONN: 256,
  SEND_CACHE: 1024,
  SEND_FAST_ZERO: 2048,
} as const;
export const NBD_REPLY_TYPE = {
  NONE: 0,
  OFFSET_DATA: 1,
  OFFSET_HOLE: 2,
  BLOCK_STATUS: 5,
  ERROR: 32769,
} as const;
export const errno = { EPERM: 1, EIO: 5, EINVAL: 22, ENOSPC: 28, ENOTSUP: 95, ESHUTDOWN: 108 } as const;

export interface OptionReply {
  readonly option: number;
  readonly type: number;
  readonly payload: Buffer;
}

export interface SimpleReply {
  readonly error: number;
  readonly cookie: bigint;
}

export interface StructuredChunk {
  readonly flags: number;
  readonly type: number;
  readonly cookie: bigint;
  readonly payload: Buffer;
}

export interface RequestFields {
  readonly command: number;
  readonly flags?: number;
  readonly cookie?: bigint;
  readonly offset?: bigint;
  readonly length?: number;
  readonly payload?: Buffer;
}

export class RawNbdClient {
  readonly socket: net.Socket;
  private chunks: Buffer[] = [];
  private bufferedBytes = 0;
  private waiter:
    | { bytes: number; resolve: (data: Buffer) => void; reject: (error: Error) => void }
    | undefined;
  private isEnded = false;
  readonly closed: Promise<void>;

  private constructor(socket: net.Socket) {
    this.socket = socket;
    socket.on("data", (chunk: Buffer) => {
      this.chunks.push(chunk);
      this.bufferedBytes += chunk.byteLength;
      this.serve();
    });
    socket.on("error", () => {});
    this.closed = new Promise((resolve) => socket.on("close", () => resolve()));
    const onEnd = () => {
      this.isEnded = true;
      this.serve();
    };
    socket.on("end", onEnd);
    socket.on("close", onEnd);
  }

  static connect(path: string): Promise<RawNbdClient> {
    return new Promise((resolve, reject) => {
      const socket = net.connect(path);
      socket.once("error", reject);
      socket.once("connect", () => {
        socket.off("error", reject);
        resolve(new RawNbdClient(socket));
      });
    });
  }

  /** Exactly `bytes` bytes; rejects when the server closes first. */
  read(bytes: number): Promise<Buffer> {
    if (this.waiter) throw new Error("one read at a time");
    return new Promise((resolve, reject) => {
      this.waiter = { bytes, resolve, reject };
      this.serve();
    });
  }

  write(data: Buffer): void {
    this.socket.write(data);
  }

  /** Resolves true when the server closed the connection (EOF), after discarding anything still sent. */
  async waitForServerClose(): Promise<boolean> {
    while (!this.isEnded) {
      await new Promise<void>((resolve) => {
        const done = () => {
          this.socket.off("data", done);
          this.socket.off("end", done);
          this.socket.off("close", done);
          resolve();
        };
        this.socket.on("data", done);
        this.socket.on("end", done);
        this.socket.on("close", done);
      });
    }
    return true;
  }

  destroy(): void {
    this.socket.destroy();
  }

  // Handshake helpers.

  async readGreeting(): Promise<Buffer> {
    return this.read(18);
  }

  sendClientFlags(flags: number): void {
    const data = Buffer.alloc(4);
    data.writeUInt32BE(flags, 0);
    this.write(data);
  }

  sendOption(option: number, payload: Buffer = Buffer.alloc(0), announcedLength = payload.byteLength): void {
    const header = Buffer.alloc(16);
    header.writeBigUInt64BE(IHAVEOPT, 0);
    header.writeUInt32BE(option, 8);
    header.writeUInt32BE(announcedLength, 12);
    this.write(Buffer.concat([header, payload]));
  }

  async readOptionReply(): Promise<OptionReply> {
    const header = await this.read(20);
    if (header.readBigUInt64BE(0) !== OPTION_REPLY_MAGIC) throw new Error("bad option reply magic");
    const length = header.readUInt32BE(16);
    const payload = length > 0 ? await this.read(length) : Buffer.alloc(0);
    return { option: header.readUInt32BE(8), type: header.readUInt32BE(12), payload };
  }

  /** Reads option replies up to and including the final one (ACK or an error). */
  async readOptionReplies(): Promise<OptionReply[]> {
    const replies: OptionReply[] = [];
    for (;;) {
      const reply = await this.readOptionReply();
      replies.push(reply);
      if (reply.type === NBD_REP.ACK || reply.type >= 0x80000000) return replies;
    }
  }

  /**
   * Greeting, client flags 3, optionally STRUCTURED_REPLY and SET_META_CONTEXT base:allocation, then GO.
   * Returns the export size and transmission flags.
   */
  async handshake(
    exportName: string,
    options: { structured?: boolean; metaContext?: boolean } = {},
  ): Promise<{ sizeBytes: bigint; transmissionFlags: number }> {
    await this.readGreeting();
    this.sendClientFlags(3);
    if (options.structured) {
      this.sendOption(NBD_OPT.STRUCTURED_REPLY);
      const reply = await this.readOptionReply();
      if (reply.type !== NBD_REP.ACK) throw new Error(`STRUCTURED_REPLY answered ${reply.type}`);
    }
    if (options.metaContext) {
      this.sendOption(NBD_OPT.SET_META_CONTEXT, metaContextPayload(exportName, ["base:allocation"]));
      const replies = await this.readOptionReplies();
      if (replies.at(-1)?.type !== NBD_REP.ACK) throw new Error("SET_META_CONTEXT failed");
    }
    this.sendOption(NBD_OPT.GO, infoPayload(exportName, []));
    const replies = await this.readOptionReplies();
    const last = replies.at(-1)!;
    if (last.type !== NBD_REP.ACK) throw new Error(`GO answered 0x${last.type.toString(16)}`);
    const exportInfo = replies.find(
      (reply) => reply.type === NBD_REP.INFO && reply.payload.readUInt16BE(0) === 0,
    );
    if (!exportInfo) throw new Error("GO without NBD_INFO_EXPORT");
    return {
      sizeBytes: exportInfo.payload.readBigUInt64BE(2),
      transmissionFlags: exportInfo.payload.readUInt16BE(10),
    };
  }

  // Transmission helpers.

  sendRequest(fields: RequestFields): void {
    this.write(requestBytes(fields));
  }

  /** Reads the 4-byte magic of the next reply and then the rest of a simple reply or a structured chunk. */
  async readReply(): Promise<
    ({ kind: "simple" } & SimpleReply) | ({ kind: "structured" } & StructuredChunk)
  > {
    const magicBytes = await this.read(4);
    const magic = magicBytes.readUInt32BE(0);
    if (magic === SIMPLE_REPLY_MAGIC) {
      const rest = await this.read(12);
      return { kind: "simple", error: rest.readUInt32BE(0), cookie: rest.readBigUInt64BE(4) };
    }
    if (magic === STRUCTURED_REPLY_MAGIC) {
      const rest = await this.read(16);
      const length = rest.readUInt32BE(12);
      const payload = length > 0 ? await this.read(length) : Buffer.alloc(0);
      return {
        kind: "structured",
        flags: rest.readUInt16BE(0),
        type: rest.readUInt16BE(2),
        cookie: rest.readBigUInt64BE(4),
        payload,
      };
    }
    throw new Error(`unexpected reply magic 0x${magic.toString(16)}`);
  }

  async readSimpleReply(): Promise<SimpleReply> {
    const reply = await this.readReply();
    if (reply.kind !== "simple") throw new Error(`expected a simple reply, got chunk type ${reply.type}`);
    return reply;
  }

  async readStructuredChunk(): Promise<StructuredChunk> {
    const reply = await this.readReply();
    if (reply.kind !== "structured") throw new Error(`expected a structured chunk, got a simple reply`);
    return reply;
  }

  private serve(): void {
    const waiter = this.waiter;
    if (!waiter) return;
    if (this.bufferedBytes >= waiter.bytes) {
      this.waiter = undefined;
      const parts: Buffer[] = [];
      let neededBytes = waiter.bytes;
      while (neededBytes > 0) {
        const chunk = this.chunks[0]!;
        if (chunk.byteLength <= neededBytes) {
          parts.push(chunk);
          this.chunks.shift();
          neededBytes -= chunk.byteLength;
        } else {
          parts.push(chunk.subarray(0, neededBytes));
          this.chunks[0] = chunk.subarray(neededBytes);
          neededBytes = 0;
        }
      }
      this.bufferedBytes -= waiter.bytes;
      waiter.resolve(parts.length === 1 ? parts[0]! : Buffer.concat(parts));
      return;
    }
    if (this.isEnded) {
      this.waiter = undefined;
      waiter.reject(new Error(`connection closed with ${this.bufferedBytes}/${waiter.bytes} bytes read`));
    }
  }
}

export function requestBytes(fields: RequestFields): Buffer {
  const payload = fields.payload ?? Buffer.alloc(0);
  const header = Buffer.alloc(28);
  header.writeUInt32BE(REQUEST_MAGIC, 0);
  header.writeUInt16BE(fields.flags ?? 0, 4);
  header.writeUInt16BE(fields.command, 6);
  header.writeBigUInt64BE(fields.cookie ?? 1n, 8);
  header.writeBigUInt64BE(fields.offset ?? 0n, 16);
  header.writeUInt32BE(fields.length ?? payload.byteLength, 24);
  return Buffer.concat([header, payload]);
}

/** NBD_OPT_INFO / NBD_OPT_GO payload: u32 namelen, name, u16 n, n × u16. */
export function infoPayload(exportName: string | Buffer, infoRequests: readonly number[]): Buffer {
  const name = typeof exportName === "string" ? Buffer.from(exportName, "utf8") : exportName;
  const payload = Buffer.alloc(4 + name.byteLength + 2 + 2 * infoRequests.length);
  payload.writeUInt32BE(name.byteLength, 0);
  name.copy(payload, 4);
  payload.writeUInt16BE(infoRequests.length, 4 + name.byteLength);
  infoRequests.forEach((request, index) => {
    payload.writeUInt16BE(request, 4 + name.byteLength + 2 + 2 * index);
  });
  return payload;
}

/** LIST/SET_META_CONTEXT payload: u32 namelen, name, u32 nq, nq × (u32 len, query). */
export function metaContextPayload(exportName: string, queries: readonly string[]): Buffer {
  const parts: Buffer[] = [];
  const u32 = (value: number) => {
    const buffer = Buffer.alloc(4);
    buffer.writeUInt32BE(value, 0);
    return buffer;
  };
  const name = Buffer.from(exportName, "utf8");
  parts.push(u32(name.byteLength), name, u32(queries.length));
  for (const query of queries) {
    const bytes = Buffer.from(query, "utf8");
    parts.push(u32(bytes.byteLength), bytes);
  }
  return Buffer.concat(parts);
}

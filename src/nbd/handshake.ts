/**
 * The fixed-newstyle option haggling as a pure state machine (libnbd's NEWSTYLE.* states): the connection
 * feeds it the client flags, then one option at a time (header already parsed, payload complete), and it
 * answers with the replies to send and the next step: keep haggling, start the transmission with a session,
 * or close. It does no I/O, so every option rule is testable without a socket.
 *
 * Options: EXPORT_NAME, ABORT, LIST, INFO, GO, STRUCTURED_REPLY, LIST_META_CONTEXT, SET_META_CONTEXT,
 * STARTTLS; every other option (EXTENDED_HEADERS, PEEK_EXPORT, unknown numbers) gets NBD_REP_ERR_UNSUP and
 * haggling continues.
 *
 * TLS (tls.ts): with `tlsMode` off, STARTTLS gets NBD_REP_ERR_POLICY. With require, until TLS is up every
 * option but STARTTLS and ABORT gets NBD_REP_ERR_TLS_REQD (LIST too: no export name leaks) and
 * EXPORT_NAME closes the connection. STARTTLS with data, or once TLS is up, gets NBD_REP_ERR_INVALID. An
 * accepted STARTTLS is the step `starttls`; once the connection has upgraded it calls onTlsStarted(), and
 * the haggling starts again (what was negotiated in plain text is forgotten). Exports are looked up in the ExportSource when INFO, GO or EXPORT_NAME arrives. INFO
 * and GO build their replies with the same function, so they cannot differ (the nbd-server 3.24 bug in
 * docs/design/nbd-notes.md).
 *
 * Metadata contexts: every export has base:allocation (id 1, from the device's extents) plus the export's
 * own contexts (export-meta-contexts.ts: `qemu:dirty-bitmap:cbt…` on snapshot images), ids 2, 3... by their
 * place in the export's list at SET time. LIST: no query lists all; a query ending in ':' (`base:`, `qemu:`,
 * `qemu:dirty-bitmap:`) lists the contexts it prefixes; other queries match exact names; unknown
 * namespaces match nothing and are ignored, never refused. SET selects exact names only (an empty leaf
 * selects nothing, as the spec advises) and is valid for the export named in the last SET only; GO then
 * binds the selected contexts that the export still has.
 *
 * Access rules (access-rules.ts, serve --access): every lookup of an export by name (INFO, GO, EXPORT_NAME,
 * LIST_META_CONTEXT, SET_META_CONTEXT) and LIST ask the AccessPolicy about the client's identity (the PSK
 * identity or verified certificate CN given to onTlsStarted(); null in plain text). An export granted
 * `none` is answered exactly as an export that does not exist (same reply type, same message), and LIST
 * leaves it out, so a client cannot learn names it may not use. An `ro` grant is a read-only session
 * (NBD_FLAG_READ_ONLY, writes EPERM). The policy is asked at each option, so a reload applies to the rest
 * of a handshake at once.
 *
 * Not done: extended headers, a default export for the empty name (the empty name is an ordinary
 * name and must exist in the source).
 */
import type { Export, ExportSource } from "../block/export-source.js";
import { assert } from "../util/assert.js";
import { type AccessPolicy, allowAll, type Grant } from "./access-rules.js";
import { exportMetaContexts } from "./export-meta-contexts.js";
import {
  blockSizeMinimumBytes,
  blockSizePreferredBytes,
  optionsPerHandshakeMax,
  stringBytesMax,
} from "./nbd-limits.js";
import {
  NBD_CONTEXT_BASE_ALLOCATION,
  NBD_FLAG_C_FIXED_NEWSTYLE,
  NBD_FLAG_C_NO_ZEROES,
  NBD_FLAG_CAN_MULTI_CONN,
  NBD_FLAG_FIXED_NEWSTYLE,
  NBD_FLAG_HAS_FLAGS,
  NBD_FLAG_NO_ZEROES,
  NBD_FLAG_READ_ONLY,
  NBD_FLAG_SEND_CACHE,
  NBD_FLAG_SEND_DF,
  NBD_FLAG_SEND_FAST_ZERO,
  NBD_FLAG_SEND_FLUSH,
  NBD_FLAG_SEND_FUA,
  NBD_FLAG_SEND_TRIM,
  NBD_FLAG_SEND_WRITE_ZEROES,
  NBD_IHAVEOPT,
  NBD_INFO_BLOCK_SIZE,
  NBD_INFO_DESCRIPTION,
  NBD_INFO_EXPORT,
  NBD_INFO_NAME,
  NBD_MAGIC_BYTES,
  NBD_OPT_ABORT,
  NBD_OPT_EXPORT_NAME,
  NBD_OPT_GO,
  NBD_OPT_INFO,
  NBD_OPT_LIST,
  NBD_OPT_LIST_META_CONTEXT,
  NBD_OPT_SET_META_CONTEXT,
  NBD_OPT_STARTTLS,
  NBD_OPT_STRUCTURED_REPLY,
  NBD_OPTION_REPLY_HEADER_BYTES,
  NBD_REP_ACK,
  NBD_REP_ERR_INVALID,
  NBD_REP_ERR_POLICY,
  NBD_REP_ERR_SHUTDOWN,
  NBD_REP_ERR_TLS_REQD,
  NBD_REP_ERR_TOO_BIG,
  NBD_REP_ERR_UNKNOWN,
  NBD_REP_ERR_UNSUP,
  NBD_REP_INFO,
  NBD_REP_MAGIC,
  NBD_REP_META_CONTEXT,
  NBD_REP_SERVER,
} from "./nbd-protocol.js";
import type { NbdSession, SelectedMetaContext } from "./nbd-session.js";

export type HandshakeStep =
  | { readonly kind: "continue"; readonly replies: readonly Buffer[] }
  | { readonly kind: "transmission"; readonly replies: readonly Buffer[]; readonly session: NbdSession }
  | { readonly kind: "close"; readonly replies: readonly Buffer[]; readonly reason: string }
  /** STARTTLS accepted: send the replies, then upgrade the socket before reading anything more. */
  | { readonly kind: "starttls"; readonly replies: readonly Buffer[] };

export interface HandshakeOptions {
  readonly source: ExportSource;
  readonly requestLengthBytesMax: number;
  /** Default off. */
  readonly tlsMode?: "off" | "on" | "require";
  /** Who may use which export (serve --access); default allowAll. */
  readonly access?: AccessPolicy;
}

/** The context id of base:allocation after SET_META_CONTEXT (ids are per connection and opaque). */
export const baseAllocationContextId = 1;
const exportNameZeroPaddingBytes = 124;

export class Handshake {
  private readonly source: ExportSource;
  private readonly requestLengthBytesMax: number;
  private readonly tlsMode: "off" | "on" | "require";
  private readonly access: AccessPolicy;
  private isTlsUp = false;
  /** The PSK identity or verified certificate CN once TLS is up; null in plain text or without one. */
  private identity: string | null = null;
  private clientFlags = 0;
  private optionCount = 0;
  private structuredReplies = false;
  /** The last SET_META_CONTEXT's export and its selected context names with their ids; none if empty. */
  private metaContextSelection:
    | { readonly exportName: string; readonly contextIds: ReadonlyMap<string, number> }
    | undefined;
  /** Set by the server's close(): every option but ABORT is answered NBD_REP_ERR_SHUTDOWN. */
  isShuttingDown = false;

  constructor(options: HandshakeOptions) {
    this.source = options.source;
    this.requestLengthBytesMax = options.requestLengthBytesMax;
    this.tlsMode = options.tlsMode ?? "off";
    this.access = options.access ?? allowAll;
  }

  /** The client's identity for the access rules (null: none). */
  get clientIdentity(): string | null {
    return this.identity;
  }

  /**
   * The connection runs over TLS now, authenticated as `identity` (null: no PSK identity and no verified
   * client certificate): the option haggling starts again.
   */
  onTlsStarted(identity: string | null): void {
    assert(!this.isTlsUp, "TLS started twice");
    this.isTlsUp = true;
    this.identity = identity;
    this.structuredReplies = false;
    this.metaContextSelection = undefined;
  }

  /** The 18-byte server greeting: NBDMAGIC, IHAVEOPT, handshake flags. */
  static greeting(): Buffer {
    const greeting = Buffer.alloc(18);
    NBD_MAGIC_BYTES.copy(greeting, 0);
    greeting.writeBigUInt64BE(NBD_IHAVEOPT, 8);
    greeting.writeUInt16BE(NBD_FLAG_FIXED_NEWSTYLE | NBD_FLAG_NO_ZEROES, 16);
    return greeting;
  }

  onClientFlags(clientFlags: number): HandshakeStep {
    const offered = NBD_FLAG_C_FIXED_NEWSTYLE | NBD_FLAG_C_NO_ZEROES;
    if ((clientFlags & ~offered) !== 0) {
      return close(`client flags 0x${clientFlags.toString(16)} carry a bit the server did not offer`);
    }
    this.clientFlags = clientFlags;
    return proceed([]);
  }

  /** An option whose payload was too large to read: it was skipped, now answer it. */
  onOversizeOption(option: number): HandshakeStep {
    const limit = this.countOption();
    if (limit) return limit;
    if (option === NBD_OPT_EXPORT_NAME) return close("EXPORT_NAME payload too large");
    return proceed([optionReply(option, NBD_REP_ERR_TOO_BIG, "option payload too large")]);
  }

  onOption(option: number, payload: Buffer): HandshakeStep {
    const limit = this.countOption();
    if (limit) return limit;
    if ((this.clientFlags & NBD_FLAG_C_FIXED_NEWSTYLE) === 0 && option !== NBD_OPT_EXPORT_NAME) {
      return proceed([optionReply(option, NBD_REP_ERR_INVALID, "only EXPORT_NAME without fixed newstyle")]);
    }
    if (option === NBD_OPT_ABORT) {
      return {
        kind: "close",
        replies: [optionReply(option, NBD_REP_ACK)],
        reason: "client sent NBD_OPT_ABORT",
      };
    }
    if (this.isShuttingDown) {
      if (option === NBD_OPT_EXPORT_NAME) return close("server is shutting down");
      return proceed([optionReply(option, NBD_REP_ERR_SHUTDOWN, "server is shutting down")]);
    }
    if (option === NBD_OPT_STARTTLS) return this.onStartTls(payload);
    if (this.tlsMode === "require" && !this.isTlsUp) {
      if (option === NBD_OPT_EXPORT_NAME) return close("EXPORT_NAME before TLS on a server that requires it");
      return proceed([
        optionReply(option, NBD_REP_ERR_TLS_REQD, "this server requires TLS: send NBD_OPT_STARTTLS"),
      ]);
    }
    switch (option) {
      case NBD_OPT_EXPORT_NAME:
        return this.onExportName(payload);
      case NBD_OPT_LIST:
        return this.onList(payload);
      case NBD_OPT_STRUCTURED_REPLY:
        return this.onStructuredReply(payload);
      case NBD_OPT_INFO:
      case NBD_OPT_GO:
        return this.onInfoOrGo(option, payload);
      case NBD_OPT_LIST_META_CONTEXT:
      case NBD_OPT_SET_META_CONTEXT:
        return this.onMetaContext(option, payload);
      default:
        return proceed([optionReply(option, NBD_REP_ERR_UNSUP, "option not supported")]);
    }
  }

  private onStartTls(payload: Buffer): HandshakeStep {
    const option = NBD_OPT_STARTTLS;
    if (this.tlsMode === "off")
      return proceed([optionReply(option, NBD_REP_ERR_POLICY, "TLS is not configured")]);
    if (this.isTlsUp) return proceed([optionReply(option, NBD_REP_ERR_INVALID, "TLS is already up")]);
    if (payload.length !== 0)
      return proceed([optionReply(option, NBD_REP_ERR_INVALID, "STARTTLS takes no data")]);
    return { kind: "starttls", replies: [optionReply(option, NBD_REP_ACK)] };
  }

  private countOption(): HandshakeStep | undefined {
    this.optionCount += 1;
    if (this.optionCount > optionsPerHandshakeMax) {
      return close(`more than ${optionsPerHandshakeMax} options in one handshake`);
    }
    return undefined;
  }

  private onExportName(payload: Buffer): HandshakeStep {
    const name = decodeString(payload);
    if (name === undefined) return close("EXPORT_NAME with an invalid name");
    const found = this.findGranted(name);
    if (!found) return close(`EXPORT_NAME of unknown export ${JSON.stringify(name)}`);
    const session = this.sessionOf(found.entry, found.grant);
    const noZeroes = (this.clientFlags & NBD_FLAG_C_NO_ZEROES) !== 0;
    const reply = Buffer.alloc(10 + (noZeroes ? 0 : exportNameZeroPaddingBytes));
    reply.writeBigUInt64BE(BigInt(session.sizeBytes), 0);
    reply.writeUInt16BE(session.transmissionFlags, 8);
    return { kind: "transmission", replies: [reply], session };
  }

  private onList(payload: Buffer): HandshakeStep {
    if (payload.byteLength !== 0) {
      return proceed([optionReply(NBD_OPT_LIST, NBD_REP_ERR_INVALID, "NBD_OPT_LIST takes no data")]);
    }
    const replies: Buffer[] = [];
    for (const entry of this.source.listExports()) {
      if (this.access.grantFor(this.identity, entry.name) === "none") continue;
      const name = Buffer.from(entry.name, "utf8");
      const body = Buffer.concat([u32(name.byteLength), name, truncatedUtf8(entry.description)]);
      replies.push(optionReply(NBD_OPT_LIST, NBD_REP_SERVER, body));
    }
    replies.push(optionReply(NBD_OPT_LIST, NBD_REP_ACK));
    return proceed(replies);
  }

  private onStructuredReply(payload: Buffer): HandshakeStep {
    const option = NBD_OPT_STRUCTURED_REPLY;
    if (payload.byteLength !== 0) return proceed([optionReply(option, NBD_REP_ERR_INVALID, "takes no data")]);
    if (this.structuredReplies) {
      return proceed([optionReply(option, NBD_REP_ERR_INVALID, "structured replies already negotiated")]);
    }
    this.structuredReplies = true;
    return proceed([optionReply(option, NBD_REP_ACK)]);
  }

  private onInfoOrGo(option: number, payload: Buffer): HandshakeStep {
    // u32 namelen, name, u16 n, n × u16 info request.
    if (payload.byteLength < 6)
      return proceed([optionReply(option, NBD_REP_ERR_INVALID, "payload too short")]);
    const nameBytes = payload.readUInt32BE(0);
    if (nameBytes > payload.byteLength - 6) {
      return proceed([optionReply(option, NBD_REP_ERR_INVALID, "name length exceeds the payload")]);
    }
    const requestCount = payload.readUInt16BE(4 + nameBytes);
    if (payload.byteLength !== 4 + nameBytes + 2 + 2 * requestCount) {
      return proceed([
        optionReply(option, NBD_REP_ERR_INVALID, "info request count does not match the payload"),
      ]);
    }
    const name = decodeString(payload.subarray(4, 4 + nameBytes));
    if (name === undefined) return proceed([optionReply(option, NBD_REP_ERR_INVALID, "invalid export name")]);
    const requests = new Set<number>();
    for (let index = 0; index < requestCount; index += 1) {
      requests.add(payload.readUInt16BE(4 + nameBytes + 2 + 2 * index));
    }
    const found = this.findGranted(name);
    if (!found) {
      return proceed([optionReply(option, NBD_REP_ERR_UNKNOWN, `export ${quotedName(name)} not found`)]);
    }
    const session = this.sessionOf(found.entry, found.grant);
    const replies = this.infoReplies(option, found.entry, session, requests);
    replies.push(optionReply(option, NBD_REP_ACK));
    if (option === NBD_OPT_INFO) return proceed(replies);
    return { kind: "transmission", replies, session };
  }

  private infoReplies(option: number, entry: Export, session: NbdSession, requests: ReadonlySet<number>) {
    const exportInfo = Buffer.alloc(12);
    exportInfo.writeUInt16BE(NBD_INFO_EXPORT, 0);
    exportInfo.writeBigUInt64BE(BigInt(session.sizeBytes), 2);
    exportInfo.writeUInt16BE(session.transmissionFlags, 10);
    const replies = [optionReply(option, NBD_REP_INFO, exportInfo)];
    if (requests.has(NBD_INFO_NAME)) {
      const body = Buffer.concat([u16(NBD_INFO_NAME), Buffer.from(entry.name, "utf8")]);
      replies.push(optionReply(option, NBD_REP_INFO, body));
    }
    if (requests.has(NBD_INFO_DESCRIPTION) && entry.description !== "") {
      const body = Buffer.concat([u16(NBD_INFO_DESCRIPTION), truncatedUtf8(entry.description)]);
      replies.push(optionReply(option, NBD_REP_INFO, body));
    }
    // Always sent: our minimum of 1 byte asks nothing of a client that did not request it.
    const blockSize = Buffer.alloc(14);
    blockSize.writeUInt16BE(NBD_INFO_BLOCK_SIZE, 0);
    blockSize.writeUInt32BE(blockSizeMinimumBytes, 2);
    blockSize.writeUInt32BE(blockSizePreferredBytes, 6);
    blockSize.writeUInt32BE(this.requestLengthBytesMax, 10);
    replies.push(optionReply(option, NBD_REP_INFO, blockSize));
    return replies;
  }

  private onMetaContext(option: number, payload: Buffer): HandshakeStep {
    const isSet = option === NBD_OPT_SET_META_CONTEXT;
    // SET replaces the previous selection even when it fails (spec).
    if (isSet) this.metaContextSelection = undefined;
    if (isSet && !this.structuredReplies) {
      return proceed([optionReply(option, NBD_REP_ERR_INVALID, "negotiate structured replies first")]);
    }
    const request = parseMetaContextRequest(payload);
    if (request === undefined)
      return proceed([optionReply(option, NBD_REP_ERR_INVALID, "malformed request")]);
    const entry = this.findGranted(request.exportName)?.entry;
    if (!entry) {
      const message = `export ${quotedName(request.exportName)} not found`;
      return proceed([optionReply(option, NBD_REP_ERR_UNKNOWN, message)]);
    }
    const available = [NBD_CONTEXT_BASE_ALLOCATION, ...exportMetaContexts(entry).map(({ name }) => name)];
    const replies: Buffer[] = [];
    const contextIds = new Map<string, number>();
    available.forEach((name, index) => {
      const matches = isSet
        ? request.queries.includes(name)
        : request.queries.length === 0 || request.queries.some((query) => listQueryMatches(query, name));
      if (!matches || contextIds.has(name)) return;
      const contextId = isSet ? baseAllocationContextId + index : 0;
      contextIds.set(name, contextId);
      const body = Buffer.concat([u32(contextId), Buffer.from(name, "utf8")]);
      replies.push(optionReply(option, NBD_REP_META_CONTEXT, body));
    });
    assert(
      !isSet || new Set(contextIds.values()).size === contextIds.size,
      "SET gives every selected context its own id",
    );
    if (isSet && contextIds.size > 0) {
      this.metaContextSelection = { exportName: request.exportName, contextIds };
    }
    replies.push(optionReply(option, NBD_REP_ACK));
    return proceed(replies);
  }

  /** The export and this client's grant on it; undefined for an unknown export and for a `none` grant alike. */
  private findGranted(name: string): { entry: Export; grant: Grant } | undefined {
    const entry = this.source.findExport(name);
    if (!entry) return undefined;
    const grant = this.access.grantFor(this.identity, entry.name);
    return grant === "none" ? undefined : { entry, grant };
  }

  private sessionOf(entry: Export, grant: Grant): NbdSession {
    const device = entry.device;
    const caps = device.capabilities;
    const isReadOnly = entry.readOnly || !caps.canWrite || grant === "ro";
    let flags = NBD_FLAG_HAS_FLAGS | NBD_FLAG_SEND_CACHE;
    if (isReadOnly) flags |= NBD_FLAG_READ_ONLY;
    if (caps.canFlush) flags |= NBD_FLAG_SEND_FLUSH;
    if (!isReadOnly && caps.canFua) flags |= NBD_FLAG_SEND_FUA;
    if (!isReadOnly && caps.canTrim) flags |= NBD_FLAG_SEND_TRIM;
    if (!isReadOnly && caps.canZero) {
      flags |= NBD_FLAG_SEND_WRITE_ZEROES;
      if (caps.canFastZero) flags |= NBD_FLAG_SEND_FAST_ZERO;
    }
    // We never fragment a read, so DF is always honoured, but the flag needs structured replies.
    if (this.structuredReplies) flags |= NBD_FLAG_SEND_DF;
    if (caps.canMultiConn) flags |= NBD_FLAG_CAN_MULTI_CONN;
    const selection = this.metaContextSelection;
    const contextIds =
      this.structuredReplies && selection?.exportName === entry.name ? selection.contextIds : undefined;
    const metaContexts: SelectedMetaContext[] = [];
    for (const context of exportMetaContexts(entry)) {
      const id = contextIds?.get(context.name);
      if (id !== undefined) metaContexts.push({ id, context });
    }
    assert(
      Number.isSafeInteger(device.sizeBytes) && device.sizeBytes >= 0,
      "an export's size is a safe integer",
    );
    assert(flags <= 0xffff, "transmission flags fit in 16 bits");
    assert(
      !isReadOnly || (flags & (NBD_FLAG_SEND_TRIM | NBD_FLAG_SEND_WRITE_ZEROES | NBD_FLAG_SEND_FUA)) === 0,
      "a read-only export advertises no write command",
    );
    return {
      exportName: entry.name,
      device,
      sizeBytes: device.sizeBytes,
      isReadOnly,
      transmissionFlags: flags,
      structuredReplies: this.structuredReplies,
      baseAllocationContextId: contextIds?.get(NBD_CONTEXT_BASE_ALLOCATION) ?? 0,
      metaContexts,
      requestLengthBytesMax: this.requestLengthBytesMax,
    };
  }
}

interface MetaContextRequest {
  readonly exportName: string;
  readonly queries: readonly string[];
}

/** u32 namelen, name, u32 nq, nq × (u32 len, query); every byte must be accounted for. */
function parseMetaContextRequest(payload: Buffer): MetaContextRequest | undefined {
  let positionBytes = 0;
  const readString = (): string | undefined => {
    if (payload.byteLength - positionBytes < 4) return undefined;
    const lengthBytes = payload.readUInt32BE(positionBytes);
    positionBytes += 4;
    if (lengthBytes > payload.byteLength - positionBytes) return undefined;
    const value = decodeString(payload.subarray(positionBytes, positionBytes + lengthBytes));
    positionBytes += lengthBytes;
    return value;
  };
  const exportName = readString();
  if (exportName === undefined || payload.byteLength - positionBytes < 4) return undefined;
  const queryCount = payload.readUInt32BE(positionBytes);
  positionBytes += 4;
  // Each query takes at least 4 bytes: a count larger than that is malformed before we loop on it.
  if (queryCount > (payload.byteLength - positionBytes) / 4) return undefined;
  const queries: string[] = [];
  for (let index = 0; index < queryCount; index += 1) {
    const query = readString();
    if (query === undefined) return undefined;
    queries.push(query);
  }
  if (positionBytes !== payload.byteLength) return undefined;
  return { exportName, queries };
}

/** LIST: a query ending in ':' is a wildcard for the names it prefixes; any other query is an exact name. */
function listQueryMatches(query: string, name: string): boolean {
  return query === name || (query.endsWith(":") && name.startsWith(query));
}

const utf8Decoder = new TextDecoder("utf-8", { fatal: true });

/**
 * A client's name quoted for an error message, cut to a few hundred bytes: a 4096-byte name must not make
 * the reply's string longer than the spec's 4096-byte limit (no real export name is this long).
 */
function quotedName(name: string): string {
  const nameCharsMax = 128;
  return name.length <= nameCharsMax
    ? JSON.stringify(name)
    : `${JSON.stringify(name.slice(0, nameCharsMax))}…`;
}

/** A protocol string: at most 4096 bytes of valid UTF-8 without NUL; undefined otherwise. */
export function decodeString(bytes: Uint8Array): string | undefined {
  if (bytes.byteLength > stringBytesMax || bytes.includes(0)) return undefined;
  try {
    return utf8Decoder.decode(bytes);
  } catch {
    return undefined;
  }
}

function truncatedUtf8(text: string): Buffer {
  const bytes = Buffer.from(text, "utf8");
  if (bytes.byteLength <= stringBytesMax) return bytes;
  // Cut at a character boundary: drop continuation bytes (10xxxxxx) at the cut.
  let end = stringBytesMax;
  while (end > 0 && (bytes[end]! & 0xc0) === 0x80) end -= 1;
  return bytes.subarray(0, end);
}

function optionReply(option: number, replyType: number, payload?: Buffer | string): Buffer {
  const body = typeof payload === "string" ? Buffer.from(payload, "utf8") : (payload ?? Buffer.alloc(0));
  const reply = Buffer.allocUnsafe(NBD_OPTION_REPLY_HEADER_BYTES + body.byteLength);
  reply.writeBigUInt64BE(NBD_REP_MAGIC, 0);
  reply.writeUInt32BE(option, 8);
  reply.writeUInt32BE(replyType, 12);
  reply.writeUInt32BE(body.byteLength, 16);
  body.copy(reply, NBD_OPTION_REPLY_HEADER_BYTES);
  return reply;
}

function u32(value: number): Buffer {
  const buffer = Buffer.allocUnsafe(4);
  buffer.writeUInt32BE(value, 0);
  return buffer;
}

function u16(value: number): Buffer {
  const buffer = Buffer.allocUnsafe(2);
  buffer.writeUInt16BE(value, 0);
  return buffer;
}

function proceed(replies: readonly Buffer[]): HandshakeStep {
  return { kind: "continue", replies };
}

function close(reason: string): HandshakeStep {
  return { kind: "close", replies: [], reason };
}

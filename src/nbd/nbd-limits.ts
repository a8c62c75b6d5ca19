/**
 * Every bound of the NBD face, named once. A client may cost the server at most these amounts of memory
 * and time; past them it gets an error or loses its connection (never the daemon). Relations between the
 * limits are asserted at module load.
 */
import { assert } from "../util/assert.js";

/** Largest READ or WRITE payload (also advertised as the maximum block size); the spec's 32 MiB. */
export const requestLengthBytesMaxDefault = 32 * 1024 * 1024;
/**
 * A WRITE longer than the maximum is refused with EINVAL, but its payload must still be read or the stream
 * desyncs. Like nbdkit we swallow (discard without buffering) up to twice the maximum, and disconnect a
 * client that announces more.
 */
export const writeSkipFactorMax = 2;
/** Requests in flight per connection; beyond it the server stops reading that socket. */
export const inflightRequestsMaxDefault = 64;
/**
 * READ and WRITE bytes in flight per connection (buffers we hold). One request is always admitted, so
 * a single request of the maximum size still goes through.
 */
export const inflightBytesMax = 64 * 1024 * 1024;
/**
 * READ and WRITE data bytes in flight across all connections of a server (inflight-budget.ts): past it a
 * connection waits (stops reading its socket) instead of allocating. One client (a uid or an address) may
 * hold at most half of it, so one client cannot take the whole budget.
 */
export const inflightBudgetBytesDefault = 256 * 1024 * 1024;
export const inflightBudgetClientShare = 0.5;
/**
 * Reply bytes queued in a socket beyond which write() returns false and the connection parses no new
 * request until 'drain' (the sockets' writable high-water mark). Large enough to batch a tick of small
 * replies into one writev, small enough that a client that does not read costs little.
 */
export const replyQueueBytesMax = 1024 * 1024;
/** Parsing resumes when a completed write leaves fewer queued reply bytes than this. */
export const replyQueueBytesLow = replyQueueBytesMax / 2;
/** Connections in all, and per client (a uid on Unix sockets, an address on TCP): one client gets a quarter. */
export const connectionsMaxDefault = 256;
export const connectionsPerClientMaxDefault = 64;
/** Options per handshake, as nbdkit's MAX_NR_OPTIONS; then the connection is dropped. */
export const optionsPerHandshakeMax = 32;
/** Option payloads we read into memory; larger ones are skipped and answered NBD_REP_ERR_TOO_BIG. */
export const optionPayloadBytesMax = 64 * 1024;
/** Option payloads larger than this are not even skipped: the client is dropped. */
export const optionPayloadSkipBytesMax = 64 * 1024 * 1024;
/** Export names, context names and queries (the spec's MUST). */
export const stringBytesMax = 4096;
/** Extents in one NBD_REPLY_TYPE_BLOCK_STATUS chunk (the spec allows up to 2^20). */
export const extentsPerReplyMax = 64 * 1024;
/** A client that does not finish the handshake within this time is dropped. */
export const handshakeTimeoutMs = 30_000;
/** close(): how long in-flight requests may take before the sockets are destroyed. */
export const closeTimeoutMsDefault = 5_000;
/** A connection's reused receive buffer with in-place reads (in-place-socket.ts): ≤ 16 MiB for all. */
export const receiveBufferBytes = 64 * 1024;
/** Recycled READ reply buffers kept by one server (buffer-pool.ts), and the smallest size worth it. */
export const replyBufferPoolBytesMax = 64 * 1024 * 1024;
export const replyBufferPooledBytesMin = 4096;
/**
 * Recycled WRITE payload buffers (shared memory, written by reference by the file system writer thread)
 * kept by one server: a payload that does not arrive in one socket read is received into one of these.
 */
export const writePayloadPoolBytesMax = 32 * 1024 * 1024;
/**
 * TRIM and WRITE_ZEROES longer than this run as slices of this size with a yield to the event loop in
 * between (transmission.ts), so one 4 GiB zeroing cannot hold the daemon for seconds. Small because the
 * slowest path is slow: under a snapshot with a memory storage a slice is copied before it is zeroed, at
 * about 100 MB/s here, so 16 MiB holds the event loop ~0.15 s; 256 slices of a 4 GiB request cost nothing.
 */
export const zeroSliceBytes = 16 * 1024 * 1024;
/** Zero extents shorter than this are sent as data in structured reads (not worth a chunk). */
export const holeChunkBytesMin = 4096;
/** Advertised block sizes: minimum 1 (byte-granular) and preferred 4 KiB. */
export const blockSizeMinimumBytes = 1;
export const blockSizePreferredBytes = 4096;

assert(requestLengthBytesMaxDefault >= 1024 * 1024, "the spec wants a maximum payload of at least 1 MiB");
assert(inflightBytesMax >= requestLengthBytesMaxDefault, "one request of the maximum size must fit");
assert(
  inflightBudgetBytesDefault * inflightBudgetClientShare >= requestLengthBytesMaxDefault,
  "one request of the maximum size must fit a client's share of the budget",
);
assert(optionPayloadBytesMax >= 4 + stringBytesMax + 2, "an INFO/GO with a maximal name must fit");
assert(optionPayloadSkipBytesMax >= optionPayloadBytesMax);
assert(extentsPerReplyMax <= 2 ** 20, "the spec caps one status chunk at 2^20 extents");
assert(blockSizePreferredBytes >= 512 && blockSizePreferredBytes <= requestLengthBytesMaxDefault);

/**
 * reopenForInPlaceReads: serves an accepted connection on a socket whose reads land in buffers the
 * connection chooses (Node's `onread` option) instead of a fresh 64 KiB buffer per read.
 *
 * Why: a stream socket allocates every read's buffer anew (malloc of 64 KiB, shrunk to what arrived).
 * Under a stream of large WRITEs the heap grows and is trimmed over and over, and the kernel's copy into
 * each new buffer page-faults: perf counted 25–115 k faults per 3 s of 256 KiB writes, three quarters of
 * them in the socket read, and the server's CPU per write swung between 280 and 1060 µs with them. With
 * `onread` a connection reads headers into one reused buffer, and the rest of a WRITE payload straight
 * into the buffer the file system writer thread writes from: no allocation and no copy in JavaScript.
 *
 * How: Node offers `onread` to sockets it creates itself, not to the ones a net.Server accepts. The server
 * accepts paused (nothing is read before this), and the accepted socket's libuv handle is moved to a new
 * socket built with `onread` (the `handle` constructor option, internal to Node but the way its own
 * net.Server builds sockets). The old socket object lets go of the handle and is destroyed, which only
 * settles its net.Server's connection count. If this Node has no handle to move, the caller gets the
 * socket back unchanged and the connection takes its bytes from 'data' events as before.
 *
 * What it does not do: TLS. A connection that may upgrade (STARTTLS) keeps the stream socket.
 */
import * as net from "node:net";

/** What a connection reading in place answers: where the next read lands, and what arrived. */
export interface InPlaceReceiver {
  nextReceiveBuffer(): Uint8Array;
  onReceived(count: number, buffer: Uint8Array): void;
}

export interface InPlaceSocket {
  readonly socket: net.Socket;
  /** Binds the connection; reads before that land in `firstBuffer`, the receiver's own receive buffer. */
  bind(receiver: InPlaceReceiver): void;
}

interface HandleOwner {
  _handle?: object | null;
}

/**
 * Moves a paused, freshly accepted socket's handle to a socket that reads into `firstBuffer` and then
 * wherever the bound receiver says; undefined when this socket cannot be moved (then keep using it).
 */
export function reopenForInPlaceReads(
  accepted: net.Socket,
  firstBuffer: Uint8Array,
  highWaterMarkBytes: number,
): InPlaceSocket | undefined {
  const owner = accepted as unknown as HandleOwner;
  const handle = owner._handle;
  if (handle === null || handle === undefined || accepted.destroyed || accepted.readableLength > 0)
    return undefined;
  let receiver: InPlaceReceiver | undefined;
  const options = {
    handle,
    allowHalfOpen: accepted.allowHalfOpen,
    readable: true,
    writable: true,
    highWaterMark: highWaterMarkBytes,
    pauseOnCreate: true,
    onread: {
      // Node asks for the first buffer while it builds the socket, before the receiver exists.
      buffer: () => (receiver === undefined ? firstBuffer : receiver.nextReceiveBuffer()),
      callback: (count: number, buffer: Uint8Array) => {
        receiver?.onReceived(count, buffer);
        return true;
      },
    },
  } as net.SocketConstructorOpts;
  owner._handle = null;
  const socket = new net.Socket(options);
  accepted.destroy();
  return {
    socket,
    bind: (bound) => {
      receiver = bound;
    },
  };
}

/**
 * InflightBudget: one server-wide bound on the bytes of READ and WRITE data held in memory (WRITE payloads
 * being received or written, READ replies being read or waiting in a socket), across every connection, and
 * a smaller bound per client (nbd-server.ts's client key: a uid or an address), so that one client cannot
 * hold the whole budget either.
 *
 * A connection asks before it reads a request's payload or reads the device for it. When the bytes do not
 * fit it waits: it stops reading its socket (back-pressure to the client) until enough bytes come back.
 * Waiters are served in order; a waiter that does not fit the global bound stops the queue (so a large
 * request is not starved by a stream of small ones), one that only exceeds its own client's share is passed
 * over for the others. Both bounds are at least the largest request, so every request fits once the bytes
 * before it are returned: a wait always ends.
 *
 * Locking: none, one event loop. A grant made by a release() is delivered in a microtask, never inside the
 * caller of release().
 */
import { assert } from "../util/assert.js";

export interface BudgetTicket {
  readonly clientKey: string;
  readonly lengthBytes: number;
  /** True once the bytes are the ticket holder's; they go back with release(). */
  readonly isGranted: boolean;
}

interface Waiter extends BudgetTicket {
  isGranted: boolean;
  isCancelled: boolean;
  /** False while request() runs: a grant then is its return value, not a callback. */
  isDeliveredLater: boolean;
  readonly onGranted: () => void;
}

export class InflightBudget {
  readonly bytesMax: number;
  readonly clientBytesMax: number;
  private usedBytes = 0;
  private readonly clientUsedBytes = new Map<string, number>();
  private readonly waiters: Waiter[] = [];

  constructor(options: { readonly bytesMax: number; readonly clientBytesMax: number }) {
    assert(options.clientBytesMax >= 1 && options.clientBytesMax <= options.bytesMax);
    this.bytesMax = options.bytesMax;
    this.clientBytesMax = options.clientBytesMax;
  }

  get inUseBytes(): number {
    return this.usedBytes;
  }

  get waiterCount(): number {
    return this.waiters.length;
  }

  /**
   * Asks for `lengthBytes` (at most clientBytesMax). The ticket comes back granted when the bytes fit and
   * no waiter is before it; otherwise `onGranted` runs once it is granted (unless cancelled first).
   */
  request(clientKey: string, lengthBytes: number, onGranted: () => void): BudgetTicket {
    assert(lengthBytes >= 0 && lengthBytes <= this.clientBytesMax, "a request fits the client's share");
    const waiter: Waiter = {
      clientKey,
      lengthBytes,
      isGranted: false,
      isCancelled: false,
      isDeliveredLater: false,
      onGranted,
    };
    this.waiters.push(waiter);
    this.grantWaiters();
    waiter.isDeliveredLater = true;
    return waiter;
  }

  /** Withdraws a ticket: returns its bytes if granted, leaves the queue if not. */
  cancel(ticket: BudgetTicket): void {
    const waiter = ticket as Waiter;
    if (waiter.isCancelled) return;
    waiter.isCancelled = true;
    if (waiter.isGranted) {
      this.release(waiter.clientKey, waiter.lengthBytes);
      return;
    }
    const index = this.waiters.indexOf(waiter);
    if (index >= 0) this.waiters.splice(index, 1);
    this.grantWaiters();
  }

  /** Returns the bytes of a granted ticket. */
  release(clientKey: string, lengthBytes: number): void {
    const clientBytes = (this.clientUsedBytes.get(clientKey) ?? 0) - lengthBytes;
    assert(clientBytes >= 0 && this.usedBytes >= lengthBytes, "released more than was granted");
    if (clientBytes === 0) this.clientUsedBytes.delete(clientKey);
    else this.clientUsedBytes.set(clientKey, clientBytes);
    this.usedBytes -= lengthBytes;
    this.grantWaiters();
  }

  private fits(clientKey: string, lengthBytes: number): boolean {
    const clientBytes = this.clientUsedBytes.get(clientKey) ?? 0;
    return this.usedBytes + lengthBytes <= this.bytesMax && clientBytes + lengthBytes <= this.clientBytesMax;
  }

  private take(waiter: Waiter): void {
    waiter.isGranted = true;
    this.usedBytes += waiter.lengthBytes;
    this.clientUsedBytes.set(
      waiter.clientKey,
      (this.clientUsedBytes.get(waiter.clientKey) ?? 0) + waiter.lengthBytes,
    );
  }

  private grantWaiters(): void {
    let index = 0;
    while (index < this.waiters.length) {
      const waiter = this.waiters[index]!;
      if (this.usedBytes + waiter.lengthBytes > this.bytesMax) return;
      if (!this.fits(waiter.clientKey, waiter.lengthBytes)) {
        index += 1;
        continue;
      }
      this.waiters.splice(index, 1);
      this.take(waiter);
      if (!waiter.isDeliveredLater) continue;
      queueMicrotask(() => {
        if (!waiter.isCancelled) waiter.onGranted();
      });
    }
  }
}

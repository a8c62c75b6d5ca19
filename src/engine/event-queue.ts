/**
 * EventQueue: a snapshot's FIFO of events with a timed wait (blksnap's event_queue + WAIT_EVENT).
 * `wait(timeoutMs)` pops the oldest event or resolves null after `timeoutMs` real milliseconds (blksnap
 * passed jiffies by mistake; quirk 1). Bounded: beyond `eventsMax` queued events the oldest
 * low_space event is dropped first, then the oldest of any type, so a storm of space events cannot
 * grow memory. `close()` releases every waiter with null.
 */

import { assert } from "../util/assert.js";
import { eventsMax, waitTimeoutMsMax } from "./engine-limits.js";
import type { SnapshotEvent } from "./engine-types.js";

interface Waiter {
  readonly resolve: (event: SnapshotEvent | null) => void;
  readonly timer: NodeJS.Timeout;
}

export class EventQueue {
  private readonly events: SnapshotEvent[] = [];
  private readonly waiters: Waiter[] = [];
  private closed = false;
  droppedCount = 0;

  get length(): number {
    return this.events.length;
  }

  push(event: SnapshotEvent): void {
    if (this.closed) return;
    const waiter = this.waiters.shift();
    if (waiter) {
      clearTimeout(waiter.timer);
      waiter.resolve(event);
      return;
    }
    if (this.events.length >= eventsMax) {
      const lowSpaceIndex = this.events.findIndex((queued) => queued.type === "low_space");
      this.events.splice(Math.max(lowSpaceIndex, 0), 1);
      this.droppedCount++;
    }
    this.events.push(event);
    assert(this.events.length <= eventsMax);
  }

  wait(timeoutMs: number): Promise<SnapshotEvent | null> {
    assert(Number.isSafeInteger(timeoutMs) && timeoutMs >= 0 && timeoutMs <= waitTimeoutMsMax);
    const event = this.events.shift();
    if (event) return Promise.resolve(event);
    if (this.closed || timeoutMs === 0) return Promise.resolve(null);
    return new Promise((resolve) => {
      const timer = setTimeout(() => {
        const index = this.waiters.findIndex((waiter) => waiter.timer === timer);
        if (index >= 0) this.waiters.splice(index, 1);
        resolve(null);
      }, timeoutMs);
      this.waiters.push({ resolve, timer });
    });
  }

  close(): void {
    this.closed = true;
    for (const waiter of this.waiters.splice(0)) {
      clearTimeout(waiter.timer);
      waiter.resolve(null);
    }
  }
}

/**
 * EventLog: a snapshot's bounded, sequence-numbered log of events (blksnap's event_queue + WAIT_EVENT, made
 * readable by any number of clients). Every event gets the next `seq` (1, 2, …); a reader names its cursor
 * `since` (the last seq it has seen, 0 for the start) and gets the first event after it, so two watchers both
 * see every event and a client that reconnects with its cursor misses nothing. Reading consumes nothing.
 *
 * Bound: at most `capacity` (engine-limits eventsMax) events are kept; beyond it the oldest low_space event
 * is dropped first (a storm of them must not push out a corruption), then the oldest of any type. A reader
 * is never misled by a drop: `missed` counts the seqs between its cursor and the event it gets that are
 * gone (seqs are dense, so every hole is a dropped event).
 *
 * Cursor-less readers (blksnap-style `wait-event`, the library's waitEvent) share one cursor: each event is
 * handed to one of them, in order, as the old FIFO did. Waits are timed in real milliseconds (blksnap passed
 * jiffies by mistake; quirk 1). `close()` wakes every waiter; the kept events can still be read after it.
 * Single-threaded: every method runs to completion on the event loop, no locks. The daemon's backup jobs
 * keep their events in one too (src/daemon/backup-job-events.ts): the log is generic over the event type.
 */

import { BlockError } from "../block/errors.js";
import { assert } from "../util/assert.js";
import { eventsMax, waitTimeoutMsMax } from "./engine-limits.js";
import type { SnapshotEvent } from "./engine-types.js";

/** What the log holds: any event with a type (a snapshot's, or the daemon's backup jobs'). */
export interface TypedEvent {
  readonly type: string;
}

export interface EventRead<E extends TypedEvent = SnapshotEvent> {
  /** The first event after the cursor, or null when none came within the wait. */
  readonly event: E | null;
  /** Its sequence number, or null with no event. */
  readonly seq: number | null;
  /** The cursor to read on from: the event's seq, or the cursor given when there was none. */
  readonly nextSince: number;
  /** Events after the cursor (before this one) that the bound dropped before they were read. */
  readonly missed: number;
}

interface LoggedEvent<E> {
  readonly seq: number;
  readonly event: E;
}

interface Waiter<E extends TypedEvent> {
  /** null: a cursor-less reader, served from the shared cursor. */
  readonly since: number | null;
  readonly resolve: (read: EventRead<E>) => void;
  timer: NodeJS.Timeout | null;
}

export class EventLog<E extends TypedEvent = SnapshotEvent> {
  private readonly capacity: number;
  /** Whose events, for the message of a cursor from elsewhere ("this snapshot"). */
  private readonly owner: string;
  /** Ascending seq; holes where events were dropped. */
  private readonly entries: LoggedEvent<E>[] = [];
  private lastSeq = 0;
  private sharedCursor = 0;
  /** In arrival order: cursor-less waiters are served first come, first served. */
  private readonly waiters: Waiter<E>[] = [];
  private closed = false;
  droppedCount = 0;

  constructor(capacity = eventsMax, owner = "this snapshot") {
    assert(Number.isSafeInteger(capacity) && capacity > 0);
    this.capacity = capacity;
    this.owner = owner;
  }

  get length(): number {
    return this.entries.length;
  }

  /** The seq of the newest event (0 before the first). */
  get newestSeq(): number {
    return this.lastSeq;
  }

  /** Appends an event and returns its seq; ignored (0) once closed. */
  push(event: E): number {
    if (this.closed) return 0;
    if (this.entries.length >= this.capacity) {
      const lowSpaceIndex = this.entries.findIndex((entry) => entry.event.type === "low_space");
      this.entries.splice(Math.max(lowSpaceIndex, 0), 1);
      this.droppedCount++;
    }
    this.lastSeq++;
    this.entries.push({ seq: this.lastSeq, event });
    assert(this.entries.length <= this.capacity);
    this.wake();
    return this.lastSeq;
  }

  /** The first event after `since`, at once (null event when there is none yet). */
  read(since: number | null): EventRead<E> {
    const cursor = since ?? this.sharedCursor;
    this.checkCursor(cursor);
    const entry = this.entries.find((candidate) => candidate.seq > cursor);
    if (entry === undefined) return { event: null, seq: null, nextSince: cursor, missed: 0 };
    if (since === null) this.sharedCursor = entry.seq;
    return { event: entry.event, seq: entry.seq, nextSince: entry.seq, missed: entry.seq - cursor - 1 };
  }

  /**
   * The first event after `since` (null: the shared cursor), waiting up to `timeoutMs` for one. A cursor
   * beyond the newest event is EINVAL (a cursor from before a restart of the daemon, or made up).
   */
  wait(since: number | null, timeoutMs: number): Promise<EventRead<E>> {
    assert(Number.isSafeInteger(timeoutMs) && timeoutMs >= 0 && timeoutMs <= waitTimeoutMsMax);
    const read = this.read(since);
    if (read.event !== null || this.closed || timeoutMs === 0) return Promise.resolve(read);
    return new Promise((resolve) => {
      const waiter: Waiter<E> = { since, resolve, timer: null };
      waiter.timer = setTimeout(() => {
        this.removeWaiter(waiter);
        resolve(read);
      }, timeoutMs);
      this.waiters.push(waiter);
    });
  }

  close(): void {
    this.closed = true;
    for (const waiter of this.waiters.splice(0)) {
      if (waiter.timer !== null) clearTimeout(waiter.timer);
      waiter.resolve(this.read(waiter.since));
    }
  }

  /** Hands the new event to every cursor waiter, and to cursor-less waiters one event each, in order. */
  private wake(): void {
    for (const waiter of [...this.waiters]) {
      const read = this.read(waiter.since);
      if (read.event === null) continue;
      this.removeWaiter(waiter);
      if (waiter.timer !== null) clearTimeout(waiter.timer);
      waiter.resolve(read);
    }
  }

  private removeWaiter(waiter: Waiter<E>): void {
    const index = this.waiters.indexOf(waiter);
    if (index >= 0) this.waiters.splice(index, 1);
  }

  private checkCursor(cursor: number): void {
    if (!Number.isSafeInteger(cursor) || cursor < 0) {
      throw new BlockError("EINVAL", `An event cursor is a whole number ≥ 0, not ${cursor}`);
    }
    if (cursor > this.lastSeq) {
      throw new BlockError(
        "EINVAL",
        `Event cursor ${cursor} is beyond the newest event (${this.lastSeq}) of ${this.owner}: it is not from this daemon run`,
      );
    }
  }
}

/**
 * KeyedMutex: one FIFO mutex per integer key, created on first use and dropped when free, so memory grows
 * with the number of keys locked or waited on at this moment, not with the key space (per-chunk locks of
 * a multi-terabyte device cost nothing until touched). Fairness: waiters are served in arrival order.
 */
import { assert } from "./assert.js";

export type Release = () => void;

export class KeyedMutex {
  /** Presence of a key means "locked"; its array holds the waiters. */
  private readonly queues = new Map<number, Array<() => void>>();

  lock(key: number): Promise<Release> {
    const waiters = this.queues.get(key);
    if (!waiters) {
      this.queues.set(key, []);
      return Promise.resolve(this.releaser(key));
    }
    return new Promise((resolve) => waiters.push(() => resolve(this.releaser(key))));
  }

  isLocked(key: number): boolean {
    return this.queues.has(key);
  }

  /** Number of keys locked right now (tests and memory accounting). */
  get lockedCount(): number {
    return this.queues.size;
  }

  private releaser(key: number): Release {
    let released = false;
    return () => {
      assert(!released, "a lock was released twice");
      released = true;
      const waiters = this.queues.get(key);
      assert(waiters, "released a lock that is not held");
      const next = waiters.shift();
      if (next) next();
      else this.queues.delete(key);
    };
  }
}

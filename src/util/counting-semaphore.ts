/**
 * CountingSemaphore: at most `slots` holders at once, the rest wait in arrival order. A file backend uses
 * one to bound how many libuv pool threads its I/O may hold, so a stalled file (a frozen or dead file
 * system) ties up only its own slots and the rest of the pool keeps serving other files.
 */
import { assert } from "./assert.js";

export class CountingSemaphore {
  private readonly waiters: Array<() => void> = [];
  private idleWaiters: Array<() => void> = [];
  private held = 0;

  readonly slots: number;

  constructor(slots: number) {
    this.slots = slots;
    assert(Number.isSafeInteger(slots) && slots > 0, "a semaphore needs at least one slot");
  }

  get heldCount(): number {
    return this.held;
  }

  get waitingCount(): number {
    return this.waiters.length;
  }

  /** Runs `task` in a slot; the slot is given back however the task ends. */
  async run<T>(task: () => Promise<T>): Promise<T> {
    if (this.held < this.slots) this.held++;
    else await new Promise<void>((resolve) => this.waiters.push(resolve));
    try {
      return await task();
    } finally {
      const next = this.waiters.shift();
      // The slot passes straight to the next waiter, so `held` stays counted for it.
      if (next) next();
      else {
        this.held--;
        if (this.held === 0) this.wakeIdle();
      }
    }
  }

  /** Resolves once nobody holds or waits for a slot. */
  idle(): Promise<void> {
    if (this.held === 0 && this.waiters.length === 0) return Promise.resolve();
    return new Promise((resolve) => this.idleWaiters.push(resolve));
  }

  private wakeIdle(): void {
    const waiters = this.idleWaiters;
    this.idleWaiters = [];
    for (const wake of waiters) wake();
  }
}

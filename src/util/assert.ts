/**
 * Assertions for invariants. They stay on in production: a storage daemon that has broken an invariant
 * must crash rather than serve a wrong snapshot (TigerBeetle's rule). Operating errors are never asserted;
 * they are `BlockError`s.
 */
import { AssertionError } from "node:assert";

export function assert(condition: unknown, message?: string): asserts condition {
  if (!condition) {
    throw new AssertionError({ message: message ?? "Assertion failed", stackStartFn: assert });
  }
}

/** Documents that a condition may go either way; it checks nothing. */
export function maybe(_condition: boolean): void {}

export function assertSafeInteger(value: number, name: string): void {
  assert(Number.isSafeInteger(value), `${name} must be a safe integer: received ${value}`);
}

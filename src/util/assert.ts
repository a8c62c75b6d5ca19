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

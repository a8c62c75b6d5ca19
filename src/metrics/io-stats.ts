/**
 * IoStats: the I/O counters of one export (an origin device or a snapshot image), kept as fixed typed
 * arrays indexed by operation, so recording a request allocates nothing: requests, bytes, failures, and a
 * latency histogram per operation with the fixed buckets of latencyBucketsSeconds (counts per bucket, not
 * cumulative; the exposition cumulates them). Counts are float64: exact up to 2^53.
 *
 * No locks: recorded and read on the main thread only. Not done: per-face split (NBD or FUSE) of a
 * device's requests — the stage sits below the faces and cannot tell them apart.
 */

/** The operations counted, in array order; the `op` label's values. */
export const ioOps = ["read", "write", "trim", "zero", "flush"] as const;
export type IoOp = (typeof ioOps)[number];

export const ioOpIndex = { read: 0, write: 1, trim: 2, zero: 3, flush: 4 } as const satisfies Record<
  IoOp,
  number
>;

/** Upper bounds (le) of the latency buckets, in seconds: 50 µs … 10 s; +Inf is implicit. */
export const latencyBucketsSeconds: readonly number[] = [
  0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10,
];

/** Buckets per operation, the +Inf one included. */
const bucketsPerOp = latencyBucketsSeconds.length + 1;

export class IoStats {
  readonly requests = new Float64Array(ioOps.length);
  readonly bytes = new Float64Array(ioOps.length);
  readonly errors = new Float64Array(ioOps.length);
  readonly latencySumSeconds = new Float64Array(ioOps.length);
  /** bucketsPerOp counts per operation; the last one of each is (10 s, +Inf). */
  readonly latencyBuckets = new Float64Array(ioOps.length * bucketsPerOp);

  /** One finished request (failed ones too: their latency counts, their bytes do not). */
  record(opIndex: number, lengthBytes: number, seconds: number, failed: boolean): void {
    this.requests[opIndex]! += 1;
    if (failed) this.errors[opIndex]! += 1;
    else this.bytes[opIndex]! += lengthBytes;
    this.latencySumSeconds[opIndex]! += seconds;
    let bucket = 0;
    while (bucket < latencyBucketsSeconds.length && seconds > latencyBucketsSeconds[bucket]!) bucket++;
    this.latencyBuckets[opIndex * bucketsPerOp + bucket]! += 1;
  }

  /** Cumulative count of requests of `opIndex` that took at most the bucket's bound (+Inf: all). */
  cumulativeBuckets(opIndex: number): number[] {
    const counts: number[] = [];
    let total = 0;
    for (let bucket = 0; bucket < bucketsPerOp; bucket++) {
      total += this.latencyBuckets[opIndex * bucketsPerOp + bucket]!;
      counts.push(total);
    }
    return counts;
  }
}

/**
 * EngineCounters: what the daemon counts of the engine's happenings, as they happen (it is the engine's
 * observer): takes and their stall (a histogram with fixed buckets, and the last one), and snapshot
 * events by type. Counted from the start of this process; snapshot state itself (storage, chunks) is read
 * from the engine at each scrape instead.
 *
 * No locks: main thread only. Event types are the engine's few names, so the map stays small.
 */
import type { TextWriter } from "./text-format.js";

/** Upper bounds of the take-stall buckets, seconds: 1 ms … 60 s (+Inf implicit). */
export const takeStallBucketsSeconds: readonly number[] = [
  0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60,
];

/** Event types known in advance, so that their counters exist (at 0) before the first event. */
const knownEventTypes = ["corrupted", "no_space", "low_space", "io_error"];

export class EngineCounters {
  private readonly stallBuckets = new Float64Array(takeStallBucketsSeconds.length + 1);
  private stallSumSeconds = 0;
  private lastStallSeconds: number | null = null;
  private readonly eventsByType = new Map<string, number>(knownEventTypes.map((type) => [type, 0]));

  /** A successful take; `stallMs` null when the take reported none. */
  taken(stallMs: number | null): void {
    if (stallMs === null) return;
    const seconds = stallMs / 1000;
    let bucket = 0;
    while (bucket < takeStallBucketsSeconds.length && seconds > takeStallBucketsSeconds[bucket]!) bucket++;
    this.stallBuckets[bucket]! += 1;
    this.stallSumSeconds += seconds;
    this.lastStallSeconds = seconds;
  }

  event(type: string): void {
    this.eventsByType.set(type, (this.eventsByType.get(type) ?? 0) + 1);
  }

  write(writer: TextWriter): void {
    writer.family(
      "blocksnap_take_stall_seconds",
      "histogram",
      "How long new origin writes were held at each take since the daemon started, seconds.",
    );
    const cumulative: number[] = [];
    let total = 0;
    for (const count of this.stallBuckets) {
      total += count;
      cumulative.push(total);
    }
    writer.histogram({}, takeStallBucketsSeconds, cumulative, this.stallSumSeconds);
    writer.family(
      "blocksnap_take_stall_last_seconds",
      "gauge",
      "The stall of the last take since the daemon started, seconds (absent before the first).",
    );
    if (this.lastStallSeconds !== null) writer.sample({}, this.lastStallSeconds);
    writer.family(
      "blocksnap_events_total",
      "counter",
      "Snapshot events emitted since the daemon started, by type.",
    );
    for (const [type, count] of this.eventsByType) writer.sample({ type }, count);
  }
}

/**
 * What a tracked device tells a write-intent journal (src/persist/region-journal.ts) so that change
 * tracking survives a crash: the regions a modification is about to touch — durable before the
 * modification reaches the backend — and each take's new numbers. Optional on every device.
 */
export interface TakeNumbers {
  readonly generationId: string;
  readonly generationReason: string;
  readonly generationStartedAtMs: number;
  readonly snapNumberActive: number;
  readonly snapNumberPrevious: number;
}

export interface WriteIntent {
  /**
   * Called synchronously right after the CBT mark of a modification of [offsetBytes, +lengthBytes); the
   * modification waits for the returned promise before it is issued. null: nothing to wait for (every
   * region touched is already recorded), the common case.
   */
  beforeWrite(offsetBytes: number, lengthBytes: number): Promise<void> | null;
  /** After a take switched the CBT numbers; the take is reported done only once this resolves. */
  afterTake(numbers: TakeNumbers): Promise<void>;
}

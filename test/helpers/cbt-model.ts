/** The plain model of blksnap's CBT map used by the randomized tests: arrays and two counters. */
export class CbtModel {
  readonly blockSizeBytes: number;
  writeMap: Uint8Array;
  readMap: Uint8Array;
  active = 1;
  previous = 0;
  /** Incremented whenever the engine must start a new generation id. */
  generation = 0;

  constructor(blockSizeBytes: number, blockCount: number) {
    this.blockSizeBytes = blockSizeBytes;
    this.writeMap = new Uint8Array(blockCount);
    this.readMap = new Uint8Array(blockCount);
  }

  set(offsetBytes: number, lengthBytes: number): void {
    for (const block of this.blocks(offsetBytes, lengthBytes)) {
      this.writeMap[block] = Math.max(this.writeMap[block]!, this.active);
    }
  }

  setBoth(offsetBytes: number, lengthBytes: number): void {
    for (const block of this.blocks(offsetBytes, lengthBytes)) {
      this.writeMap[block] = Math.max(this.writeMap[block]!, this.active);
      this.readMap[block] = Math.max(this.readMap[block]!, this.previous);
    }
  }

  /** At the wrap (active 255) a new generation starts like a reset: zero maps, then the switch. */
  switchAtTake(): void {
    if (this.active === 255) {
      this.writeMap.fill(0);
      this.active = 1;
      this.generation++;
    }
    this.readMap = this.writeMap.slice();
    this.previous = this.active;
    this.active++;
  }

  private *blocks(offsetBytes: number, lengthBytes: number): Generator<number> {
    const first = Math.floor(offsetBytes / this.blockSizeBytes);
    const last = Math.floor((offsetBytes + lengthBytes - 1) / this.blockSizeBytes);
    for (let block = first; block <= last; block++) yield block;
  }
}

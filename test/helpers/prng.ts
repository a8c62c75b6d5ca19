/**
 * A small seeded PRNG (mulberry32) so randomized tests replay exactly: the seed is printed on failure and
 * read back from BLOCKSNAP_SEED.
 */
export class Prng {
  private state: number;
  readonly seed: number;

  constructor(seed: number) {
    this.seed = seed >>> 0;
    this.state = this.seed;
  }

  static fromEnvironment(): Prng {
    const fromEnv = process.env.BLOCKSNAP_SEED;
    const seed = fromEnv ? Number.parseInt(fromEnv, 10) : Math.floor(Math.random() * 2 ** 32);
    return new Prng(seed);
  }

  /** Uniform in [0, 1). */
  next(): number {
    this.state = (this.state + 0x6d2b79f5) >>> 0;
    let t = this.state;
    t = Math.imul(t ^ (t >>> 15), t | 1);
    t ^= t + Math.imul(t ^ (t >>> 7), t | 61);
    return ((t ^ (t >>> 14)) >>> 0) / 2 ** 32;
  }

  /** Integer in [min, max]. */
  int(min: number, max: number): number {
    return min + Math.floor(this.next() * (max - min + 1));
  }

  chance(probability: number): boolean {
    return this.next() < probability;
  }

  pick<T>(items: readonly T[]): T {
    const item = items[this.int(0, items.length - 1)];
    if (item === undefined) throw new Error("pick from an empty list");
    return item;
  }

  bytes(lengthBytes: number): Uint8Array {
    const bytes = new Uint8Array(lengthBytes);
    const start = this.int(0, 255);
    const step = this.int(1, 255);
    for (let i = 0; i < lengthBytes; i++) bytes[i] = (start + i * step + (i >> 9)) & 0xff;
    return bytes;
  }
}

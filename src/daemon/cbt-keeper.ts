/**
 * CbtKeeper: keeps every device's CBT through clean stops and crashes. Per device, in `<state>/cbt/`:
 * `<name>.cbt`, the checkpoint (the fine maps, cbt-state-codec.ts, replaced atomically and durably), and
 * `<name>.journal`, the write-intent journal (src/persist/region-journal.ts) that records, durably and
 * before the write is issued, every region written since the last checkpoint.
 *
 * Start: a journal that says `clean` (a clean stop wrote the checkpoint after the last write) gives the
 * exact maps, if the backend is unchanged (device, inode, size, modification time). Otherwise the daemon
 * crashed (or the host: the boot id differs): the checkpoint plus every dirty region raised
 * (src/persist/cbt-recovery.ts), same generation; only device, inode and size can be compared then, since
 * the crash left the modification time newer than any record. What cannot be trusted (no or damaged
 * journal, a checkpoint the journal needs but that is missing or damaged, another backend, another size)
 * starts a new generation whose reason says why. A state from before the journal existed (a checkpoint
 * alone) is taken as a clean stop's.
 *
 * Running: a checkpoint every checkpointIntervalMs while some region is dirty; before clearing the first
 * region of a generation, the journal header names that checkpoint's generation, so that recovery knows it
 * must find it. Stop: a last checkpoint, then the journal marked clean. `memory:` devices have neither:
 * they come back empty, in a new generation.
 *
 * Locking: per device, checkpoints run one at a time (a promise chain); all of it on the event loop.
 */
import { readFileSync } from "node:fs";
import { mkdir, readFile, rm, stat } from "node:fs/promises";
import { dirname } from "node:path";
import { toBlockError } from "../block/errors.js";
import type { TakeNumbers, WriteIntent } from "../block/write-intent.js";
import type { CbtState } from "../cbt/cbt-map.js";
import { decodeCbtState, encodeCbtState } from "../cbt/cbt-state-codec.js";
import { memoryBackendPath } from "../engine/engine.js";
import { recoverAfterCrash } from "../persist/cbt-recovery.js";
import { NodePersistFile } from "../persist/persist-file.js";
import {
  decodeJournal,
  type LoadedJournal,
  RegionJournal,
  regionBlocksDefault,
} from "../persist/region-journal.js";
import type { Logger } from "../util/logger.js";
import { writeFileAtomic } from "./atomic-write.js";
import { cbtJournalPathIn, cbtStatePathIn } from "./paths.js";

const checkpointIntervalMs = 30_000;
/** A documented test hook: where the boot id is read (a changed one simulates a host crash). */
const bootIdPathEnvironmentKey = "BLOCKSNAP_TEST_BOOT_ID_PATH";
/** A documented benchmark hook: `1` runs without journals (a crash then costs the CBT generation). */
const noJournalEnvironmentKey = "BLOCKSNAP_BENCH_NO_CBT_JOURNAL";

export interface LoadedCbt {
  /** What DeviceAddOptions takes: the state to restore, or why a new generation starts. */
  readonly add: { readonly cbtState: CbtState } | { readonly cbtGenerationReason: string };
  /** The journal to go on with (its dirty regions stay dirty until a checkpoint): recovered ones only. */
  readonly previous: LoadedJournal | null;
  /** For the log and status. */
  readonly outcome: string;
}

interface Kept {
  readonly name: string;
  readonly backendPath: string;
  readonly intent: DeferredIntent;
  journal: RegionJournal | null;
  checkpointGenerationId: string | null;
  chain: Promise<void>;
}

type Identity = Readonly<Record<string, string>>;

export function currentBootId(): string {
  const path = process.env[bootIdPathEnvironmentKey] ?? "/proc/sys/kernel/random/boot_id";
  try {
    return readFileSync(path, "utf8").trim();
  } catch {
    return "unknown";
  }
}

async function identityOf(backendPath: string): Promise<{ stable: Identity; mtimeNs: string } | null> {
  if (backendPath === memoryBackendPath) return null;
  const stats = await stat(backendPath, { bigint: true });
  if (stats.isBlockDevice())
    return { stable: { kind: "block-device", rdev: stats.rdev.toString() }, mtimeNs: "" };
  return {
    stable: {
      kind: "file",
      dev: stats.dev.toString(),
      ino: stats.ino.toString(),
      size: stats.size.toString(),
    },
    mtimeNs: stats.mtimeNs.toString(),
  };
}

function sameStable(saved: Readonly<Record<string, string | number>>, now: Identity): string | null {
  for (const key of ["kind", "rdev", "dev", "ino", "size"]) {
    if (String(saved[key] ?? "") !== (now[key] ?? "")) {
      return key === "size" ? "the backend's size changed" : "the backend is not the same file or device";
    }
  }
  return null;
}

async function readOptional(path: string): Promise<Buffer | null> {
  try {
    return await readFile(path);
  } catch (error) {
    if ((error as NodeJS.ErrnoException).code === "ENOENT") return null;
    throw error;
  }
}

/** A WriteIntent that waits for the journal until the device is attached (writes may come first). */
class DeferredIntent implements WriteIntent {
  private target: WriteIntent | null = null;
  private readonly started: Promise<void>;
  private resolveStarted: () => void = () => {};

  constructor() {
    this.started = new Promise((resolve) => {
      this.resolveStarted = resolve;
    });
  }

  /** From now on every call goes to `target` (null: nothing is journaled). */
  start(target: WriteIntent | null): void {
    this.target = target;
    this.resolveStarted();
  }

  beforeWrite(offsetBytes: number, lengthBytes: number): Promise<void> | null {
    if (this.target !== null) return this.target.beforeWrite(offsetBytes, lengthBytes);
    return this.started.then(() => this.target?.beforeWrite(offsetBytes, lengthBytes) ?? undefined);
  }

  async afterTake(numbers: TakeNumbers): Promise<void> {
    await this.started;
    await this.target?.afterTake(numbers);
  }
}

export class CbtKeeper {
  private readonly stateDir: string;
  private readonly logger: Logger;
  private readonly bootId = currentBootId();
  private readonly kept = new Map<string, Kept>();
  private readonly timer: NodeJS.Timeout;
  private readonly cbtStateOf: (name: string) => CbtState;

  constructor(stateDir: string, logger: Logger, cbtStateOf: (name: string) => CbtState) {
    this.stateDir = stateDir;
    this.logger = logger;
    this.cbtStateOf = cbtStateOf;
    this.timer = setInterval(() => void this.checkpointAll(), checkpointIntervalMs);
    this.timer.unref();
  }

  /** What the saved files say for a device being restored; never throws (an unusable state is a reason). */
  async load(name: string, backendPath: string): Promise<LoadedCbt> {
    if (backendPath === memoryBackendPath) {
      const reason = "untrusted: memory: devices come back empty";
      return { add: { cbtGenerationReason: reason }, previous: null, outcome: reason };
    }
    try {
      return await this.loadFiles(name, backendPath);
    } catch (error) {
      const reason = `untrusted: ${toBlockError(error, "saved CBT state").message}`;
      return { add: { cbtGenerationReason: reason }, previous: null, outcome: reason };
    }
  }

  private async loadFiles(name: string, backendPath: string): Promise<LoadedCbt> {
    const untrusted = (why: string): LoadedCbt => ({
      add: { cbtGenerationReason: `untrusted: ${why}` },
      previous: null,
      outcome: `untrusted: ${why}`,
    });
    const checkpointBytes = await readOptional(cbtStatePathIn(this.stateDir, name));
    const journalBytes = await readOptional(cbtJournalPathIn(this.stateDir, name));
    const now = await identityOf(backendPath);
    if (now === null) return untrusted("no backend identity");
    const decoded = checkpointBytes === null ? null : decodeOrError(checkpointBytes);
    const checkpoint = decoded !== null && "state" in decoded ? decoded : null;
    const damaged = decoded !== null && "error" in decoded ? decoded.error : null;
    if (journalBytes === null) {
      // A state saved before the journal existed: a clean stop's, with the full identity.
      if (checkpoint === null) {
        return untrusted(damaged ?? "no state saved at a clean stop (the daemon crashed or was killed)");
      }
      const changed = sameStable(checkpoint.backendIdentity, now.stable);
      if (changed !== null) return untrusted(changed);
      if (String(checkpoint.backendIdentity.mtimeNs ?? "") !== now.mtimeNs) {
        return untrusted("the backend was modified while blocksnap was not serving it");
      }
      return { add: { cbtState: checkpoint.state }, previous: null, outcome: "restored after a clean stop" };
    }
    let journal: LoadedJournal;
    try {
      journal = decodeJournal(journalBytes);
    } catch (error) {
      return untrusted(toBlockError(error, "CBT journal").message);
    }
    const { header } = journal;
    const changed = sameStable(header.backendIdentity, now.stable);
    if (changed !== null) return untrusted(changed);
    if (header.clean && checkpoint !== null && checkpoint.state.generationId === header.generationId) {
      if (String(checkpoint.backendIdentity.mtimeNs ?? "") !== now.mtimeNs) {
        return untrusted("the backend was modified while blocksnap was not serving it");
      }
      return { add: { cbtState: checkpoint.state }, previous: null, outcome: "restored after a clean stop" };
    }
    const result = recoverAfterCrash(checkpoint?.state ?? null, damaged, journal);
    if (result.kind === "untrusted") return untrusted(result.reason);
    const recovered = result.recovery;
    const crash = header.bootId === this.bootId ? "a daemon crash" : "a host crash (the boot id changed)";
    return {
      add: { cbtState: recovered.state },
      previous: journal,
      outcome: `recovered after ${crash}: ${recovered.regionsRaised} dirty region(s), ${recovered.blocksRaised} block(s) raised`,
    };
  }

  /** The write intent to give the engine for a device about to be added (restored or new). */
  intentFor(name: string, backendPath: string): WriteIntent {
    const intent = new DeferredIntent();
    this.kept.set(name, {
      name,
      backendPath,
      intent,
      journal: null,
      checkpointGenerationId: null,
      chain: Promise.resolve(),
    });
    return intent;
  }

  /**
   * The device is attached: start its journal (keeping a recovered one's dirty regions) with the engine's
   * numbers. A recovered device is checkpointed at once, so its dirty regions soon clear.
   */
  async attach(name: string, previous: LoadedJournal | null): Promise<void> {
    const kept = this.kept.get(name);
    if (kept === undefined) return;
    const identity = await identityOf(kept.backendPath).catch(() => null);
    if (identity === null || process.env[noJournalEnvironmentKey] === "1") {
      kept.intent.start(null);
      return;
    }
    const state = this.cbtStateOf(name);
    const path = cbtJournalPathIn(this.stateDir, name);
    try {
      await mkdir(dirname(path), { recursive: true, mode: 0o700 });
      const file = await NodePersistFile.open(path);
      const keepPrevious = previous !== null && previous.header.generationId === state.generationId;
      kept.checkpointGenerationId = keepPrevious ? previous.header.checkpointGenerationId : null;
      kept.journal = await RegionJournal.start(
        file,
        {
          generationId: state.generationId,
          generationReason: state.generationReason,
          generationStartedAtMs: state.generationStartedAtMs,
          snapNumberActive: state.snapNumberActive,
          snapNumberPrevious: state.snapNumberPrevious,
          blockSizeBytes: state.blockSizeBytes,
          deviceSizeBytes: state.deviceSizeBytes,
          regionBlocks: regionBlocksDefault,
          backendIdentity: identity.stable,
          bootId: this.bootId,
          checkpointGenerationId: kept.checkpointGenerationId,
        },
        keepPrevious ? previous : null,
        (error) => this.journalBroken(name, error),
      );
      kept.intent.start(kept.journal);
      if (keepPrevious) void this.checkpoint(name);
    } catch (error) {
      kept.intent.start(null);
      this.journalBroken(name, error);
    }
  }

  /** Writes the device's maps and then lets its journal clear the regions they cover. */
  checkpoint(name: string, options: { readonly clean?: boolean } = {}): Promise<void> {
    const kept = this.kept.get(name);
    if (kept === undefined) return Promise.resolve();
    const run = kept.chain.then(async () => {
      const journal = kept.journal;
      if (journal === null) return;
      if (journal.dirtyRegionCount === 0 && options.clean !== true) return;
      const token = journal.checkpointBegin();
      const state = this.cbtStateOf(name);
      const identity = await identityOf(kept.backendPath);
      if (identity === null) return;
      const path = cbtStatePathIn(this.stateDir, name);
      await writeFileAtomic(
        path,
        encodeCbtState({ state, backendIdentity: { ...identity.stable, mtimeNs: identity.mtimeNs } }),
      );
      if (kept.checkpointGenerationId !== state.generationId) {
        // Before any region is cleared: recovery must know this generation's checkpoint is needed.
        await journal.setCheckpointGeneration(state.generationId);
        kept.checkpointGenerationId = state.generationId;
      }
      await journal.checkpointDone(token, options);
    });
    kept.chain = run.catch((error: unknown) => {
      this.logger.error(
        { device: name, err: toBlockError(error, "CBT checkpoint").message },
        "CBT checkpoint failed",
      );
    });
    return run;
  }

  private async checkpointAll(): Promise<void> {
    for (const name of this.kept.keys()) await this.checkpoint(name).catch(() => {});
  }

  /** A clean stop (no write can follow): exact maps on disk and every journal marked clean. */
  async stopClean(): Promise<void> {
    clearInterval(this.timer);
    for (const [name, kept] of this.kept) {
      try {
        await this.checkpoint(name, { clean: true });
      } catch (error) {
        this.logger.error(
          { device: name, err: toBlockError(error, "CBT state").message },
          "cannot save the CBT state: after a restart this device recovers from its journal",
        );
      }
      await kept.journal?.close().catch(() => {});
      kept.journal = null;
    }
  }

  /** Stops without marking clean (a failed start's undo): the next start recovers from the journals. */
  async close(): Promise<void> {
    clearInterval(this.timer);
    for (const kept of this.kept.values()) await kept.journal?.close().catch(() => {});
  }

  /** The device did not attach: forget it here, keep its files (it may come back at the next start). */
  release(name: string): void {
    this.kept.get(name)?.intent.start(null);
    this.kept.delete(name);
  }

  /** The device is gone (or its name is reused): its files go too. */
  async forget(name: string): Promise<void> {
    const kept = this.kept.get(name);
    this.kept.delete(name);
    if (kept !== undefined) {
      await kept.chain;
      await kept.journal?.close().catch(() => {});
    }
    await rm(cbtStatePathIn(this.stateDir, name), { force: true });
    await rm(cbtJournalPathIn(this.stateDir, name), { force: true });
  }

  /** Regions and their size, for status. */
  journalInfo(name: string): { regionSizeBytes: number; dirtyRegions: number } | null {
    const journal = this.kept.get(name)?.journal;
    return journal
      ? { regionSizeBytes: journal.regionSizeBytes, dirtyRegions: journal.dirtyRegionCount }
      : null;
  }

  private journalBroken(name: string, error: unknown): void {
    this.logger.error(
      { device: name, err: toBlockError(error, "CBT journal").message },
      "the CBT journal cannot be written: it is removed, and after a crash this device starts a new CBT generation",
    );
    void rm(cbtJournalPathIn(this.stateDir, name), { force: true }).catch(() => {});
    void rm(cbtStatePathIn(this.stateDir, name), { force: true }).catch(() => {});
  }
}

function decodeOrError(bytes: Buffer): ReturnType<typeof decodeCbtState> | { readonly error: string } {
  try {
    return decodeCbtState(bytes);
  } catch (error) {
    return { error: toBlockError(error, "CBT state").message };
  }
}

/**
 * LoopFreezer: the Freezer that blocksnap's daemon uses (docs/design/semantics.md, issue "freeze and thaw around
 * take"). At take: run the pre-take hook; find the file systems mounted on loop devices over the member
 * devices' FUSE files; freeze them all concurrently (each bounded by the timeout). The engine then holds,
 * switches and releases writes, and calls thaw(): every frozen file system is thawed — always, also when
 * the take or a freeze failed — then the post-take hook runs.
 *
 * Problems never abort the take: a freeze that fails is reported on its mount and the others go on, as
 * blksnap only warns when bdev_freeze fails. A pre-take hook that fails is reported too; the take still
 * happens (the snapshot is then only crash-consistent, which the report says).
 *
 * Bounded: each hook, freeze and thaw answers within the timeout. A freeze that times out is reported as
 * failed; if it completes later (its sync was only slow), the file system is thawed then, so nothing stays
 * frozen. A file system frozen by someone else before the take is refused by the kernel (EBUSY), reported,
 * and left frozen, as its owner expects.
 */
import { performance } from "node:perf_hooks";
import type { FrozenMount, HookResult, TakeReport } from "../engine/engine-types.js";
import type { FreezeContext, Freezer, FreezeSession } from "../engine/freezer.js";
import { type Logger, silentLogger } from "../util/logger.js";
import { fsfreeze } from "./fsfreeze.js";
import { findLoopMounts, type LoopMount } from "./mount-discovery.js";
import { runTakeHook } from "./take-hooks.js";

export interface LoopFreezerOptions {
  /** The FUSE file that serves a device, or null when FUSE is off. */
  readonly deviceFilePath: (deviceName: string) => string | null;
  readonly logger?: Logger;
}

interface FrozenState {
  readonly device: string;
  readonly mount: LoopMount;
  readonly freezeMs: number;
  readonly frozenAtMs: number;
  readonly error: string | null;
}

export class LoopFreezer implements Freezer {
  private readonly deviceFilePath: (deviceName: string) => string | null;
  private readonly logger: Logger;

  constructor(options: LoopFreezerOptions) {
    this.deviceFilePath = options.deviceFilePath;
    this.logger = options.logger ?? silentLogger;
  }

  async freeze(context: FreezeContext): Promise<FreezeSession> {
    const preTake = context.preTakeCommand
      ? await runTakeHook({
          command: context.preTakeCommand,
          hook: "pre-take",
          snapshotId: context.snapshotId,
          deviceNames: context.deviceNames,
          timeoutMs: context.timeoutMs,
        })
      : null;
    const byFile = new Map<string, string>();
    for (const device of context.deviceNames) {
      const path = this.deviceFilePath(device);
      if (path) byFile.set(path, device);
    }
    const mounts = byFile.size > 0 ? findLoopMounts([...byFile.keys()]) : [];
    const states = await Promise.all(
      mounts.map(async (mount): Promise<FrozenState> => {
        const freezeStartMs = performance.now();
        const result = await fsfreeze("freeze", mount.mountPoint, context.timeoutMs);
        const frozenAtMs = performance.now();
        if (!result.ok)
          this.logger.warn({ mountPoint: mount.mountPoint, error: result.message }, "freeze failed");
        result.late?.then((froze) => {
          if (froze) void this.thawLate(mount, context.timeoutMs);
        });
        return {
          device: byFile.get(mount.backingFile) ?? "",
          mount,
          freezeMs: frozenAtMs - freezeStartMs,
          frozenAtMs,
          error: result.ok ? null : result.message,
        };
      }),
    );
    return { thaw: (takeError) => this.thaw(context, states, preTake, takeError) };
  }

  /** A freeze that timed out and completed afterwards froze the file system behind our back: thaw it. */
  private async thawLate(mount: LoopMount, timeoutMs: number): Promise<void> {
    const result = await fsfreeze("thaw", mount.mountPoint, timeoutMs);
    if (result.ok) this.logger.warn({ mountPoint: mount.mountPoint }, "a freeze completed late; thawed");
    else this.logger.error({ mountPoint: mount.mountPoint, error: result.message }, "late thaw failed");
  }

  private async thaw(
    context: FreezeContext,
    states: readonly FrozenState[],
    preTake: HookResult | null,
    takeError: Error | null,
  ): Promise<TakeReport> {
    const frozen = await Promise.all(
      states.map(async (state): Promise<FrozenMount> => {
        const report = {
          device: state.device,
          mountPoint: state.mount.mountPoint,
          loopDevice: state.mount.loopDevice,
          fsType: state.mount.fsType,
          freezeMs: state.freezeMs,
        };
        // A freeze that failed is not ours to undo: EBUSY means someone else froze it, and a freeze that
        // timed out is thawed by thawLate() if it ever completes.
        if (state.error !== null) return { ...report, frozenMs: 0, error: state.error };
        const result = await fsfreeze("thaw", state.mount.mountPoint, context.timeoutMs);
        const frozenMs = performance.now() - state.frozenAtMs;
        result.late?.then((thawed) => {
          if (!thawed) this.logger.error({ mountPoint: state.mount.mountPoint }, "late thaw failed");
        });
        if (!result.ok)
          this.logger.error({ mountPoint: state.mount.mountPoint, error: result.message }, "thaw failed");
        return { ...report, frozenMs, error: result.ok ? null : result.message };
      }),
    );
    const postTake = context.postTakeCommand
      ? await runTakeHook({
          command: context.postTakeCommand,
          hook: "post-take",
          snapshotId: context.snapshotId,
          deviceNames: context.deviceNames,
          timeoutMs: context.timeoutMs,
          takeResult: takeError ? "failed" : "ok",
        })
      : null;
    return { frozen, preTake, postTake };
  }
}

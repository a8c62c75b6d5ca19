/**
 * The persistent list of devices (`<state>/devices.json`), so that devices come back after a restart.
 * Only what the user asked for is stored (name, backend path, CBT block size override); the size is read
 * again from the backend (a file is never re-created at restore: a vanished disk is reported, not replaced
 * by an empty one). CBT goes on in the same generation after a clean stop and after a crash (cbt-keeper.ts:
 * checkpoints and a write-intent journal) and starts a new one, with the reason, when the saved state
 * cannot be trusted. A `memory:` device also keeps its size and comes back empty, like a RAM disk after a reboot.
 * A device whose backend cannot be opened at start stays in the registry as "unavailable" (a disk that is
 * late to appear must not silently lose its configuration); `device remove` drops it, `device add` with
 * its name replaces it.
 *
 * Locking: add/remove run one at a time (a promise chain), so the file always reflects the engine's
 * devices in the order the changes happened. The file is replaced atomically (atomic-write.ts).
 *
 * Remove is all or nothing: a device that is in use (a file system mounted on a loop device over its FUSE
 * file: its journal would abort) is refused with EBUSY unless forced; the engine's remove restores the
 * device when its final flush fails; and when the file cannot be saved afterwards, the device is attached
 * again, so the list and the file never disagree.
 */
import { readFile } from "node:fs/promises";
import { dirname } from "node:path";
import { z } from "zod";
import { BlockError, toBlockError } from "../block/errors.js";
import { memoryBackendPath } from "../engine/engine.js";
import { devicesMax, pathCharsMax } from "../engine/engine-limits.js";
import type { DeviceAddOptions, DeviceInfo } from "../engine/engine-types.js";
import { deviceNameCharsMax } from "../engine/names.js";
import type { Logger } from "../util/logger.js";
import { writeFileAtomic } from "./atomic-write.js";
import { CbtKeeper } from "./cbt-keeper.js";
import type { ControlEngine } from "./control-engine.js";

const registryEntrySchema = z.object({
  name: z.string().min(1).max(deviceNameCharsMax),
  backendPath: z.string().min(1).max(pathCharsMax),
  cbtBlockSizeBytes: z.int().positive().optional(),
  /** Only for `memory:` devices. */
  sizeBytes: z.int().positive().optional(),
});

const registryFileSchema = z.object({
  version: z.literal(1),
  devices: z.array(registryEntrySchema).max(devicesMax),
});

export type RegistryEntry = z.infer<typeof registryEntrySchema>;

export interface UnavailableDevice {
  readonly name: string;
  readonly backendPath: string;
  readonly error: { readonly errno: string; readonly message: string };
}

export interface DeviceRegistryOptions {
  /** Who uses a device outside the daemon (mounts on loop devices over its FUSE file); none by default. */
  readonly deviceUsers?: (name: string) => Promise<string[]>;
}

export interface RemoveOptions {
  /** Remove even while the device is in use (what uses it then sees I/O errors). */
  readonly force?: boolean;
}

export class DeviceRegistry {
  readonly path: string;
  /** The directory of devices.json, where the CBT states wait across a restart. */
  private readonly stateDir: string;
  private readonly engine: ControlEngine;
  private readonly logger: Logger;
  private readonly deviceUsers: (name: string) => Promise<string[]>;
  /** Insertion-ordered: the file lists devices in the order they were added. */
  private readonly entries = new Map<string, RegistryEntry>();
  private readonly unavailableDevices = new Map<string, UnavailableDevice>();
  private readonly cbtOutcomes = new Map<string, string>();
  private tail: Promise<unknown> = Promise.resolve();
  readonly cbt: CbtKeeper;

  constructor(path: string, engine: ControlEngine, logger: Logger, options: DeviceRegistryOptions = {}) {
    this.path = path;
    this.stateDir = dirname(path);
    this.engine = engine;
    this.logger = logger;
    this.deviceUsers = options.deviceUsers ?? (async () => []);
    this.cbt = new CbtKeeper(this.stateDir, logger, (name) => engine.cbtState(name));
  }

  /** Reads the file (absent = empty) and attaches every device. Fails on a malformed file. */
  async restore(): Promise<void> {
    for (const entry of await readRegistryFile(this.path)) {
      this.entries.set(entry.name, entry);
      try {
        const loaded = await this.cbt.load(entry.name, entry.backendPath);
        const writeIntent = this.cbt.intentFor(entry.name, entry.backendPath);
        let info: DeviceInfo;
        try {
          info = await this.engine.addDevice({ ...entry, ...loaded.add, writeIntent });
        } catch (error) {
          this.cbt.release(entry.name);
          throw error;
        }
        await this.cbt.attach(entry.name, loaded.previous);
        this.cbtOutcomes.set(entry.name, loaded.outcome);
        const kept = "cbtState" in loaded.add;
        this.logger.info(
          {
            device: entry.name,
            backendPath: entry.backendPath,
            cbtGeneration: info.cbt.generationId,
            cbtChangesNumber: info.cbt.changesNumber,
            cbtGenerationReason: info.cbt.generationReason,
            cbtRecovery: loaded.outcome,
          },
          kept ? "device restored; CBT generation kept" : "device restored; CBT starts a new generation",
        );
      } catch (error) {
        const blockError = toBlockError(error, `device ${entry.name}`);
        this.unavailableDevices.set(entry.name, {
          name: entry.name,
          backendPath: entry.backendPath,
          error: { errno: blockError.errno, message: blockError.message },
        });
        this.logger.error(
          {
            device: entry.name,
            backendPath: entry.backendPath,
            errno: blockError.errno,
            err: blockError.message,
          },
          "device could not be restored; it stays registered as unavailable",
        );
      }
    }
  }

  /**
   * A clean stop (after the faces stopped): every device's exact CBT maps on disk and its journal marked
   * clean. What fails is logged; such a device recovers from its journal at the next start.
   */
  async saveCbtStates(): Promise<void> {
    await this.cbt.stopClean();
  }

  /** What the start found for each restored device's CBT (status). */
  cbtRecoveries(): Record<string, string> {
    return Object.fromEntries(this.cbtOutcomes);
  }

  unavailable(): UnavailableDevice[] {
    return [...this.unavailableDevices.values()];
  }

  add(options: DeviceAddOptions): Promise<DeviceInfo> {
    return this.serialized(async () => {
      // A state left from an earlier life of this name must never be taken for this device's.
      await this.cbt.forget(options.name);
      const writeIntent = this.cbt.intentFor(options.name, options.backendPath);
      let info: DeviceInfo;
      try {
        info = await this.engine.addDevice({ ...options, writeIntent });
      } catch (error) {
        this.cbt.release(options.name);
        throw error;
      }
      await this.cbt.attach(options.name, null);
      const entry: RegistryEntry = { name: options.name, backendPath: options.backendPath };
      if (options.cbtBlockSizeBytes !== undefined) entry.cbtBlockSizeBytes = options.cbtBlockSizeBytes;
      if (options.backendPath === memoryBackendPath) entry.sizeBytes = info.sizeBytes;
      const previous = this.entries.get(options.name);
      const previousUnavailable = this.unavailableDevices.get(options.name);
      this.entries.delete(options.name);
      this.entries.set(options.name, entry);
      this.unavailableDevices.delete(options.name);
      try {
        await this.save();
      } catch (error) {
        this.entries.delete(options.name);
        if (previous !== undefined) this.entries.set(options.name, previous);
        if (previousUnavailable !== undefined) this.unavailableDevices.set(options.name, previousUnavailable);
        await this.engine.removeDevice(options.name).catch(() => {});
        await this.cbt.forget(options.name);
        throw toBlockError(error, `device ${options.name} not added: cannot save ${this.path}`);
      }
      return info;
    });
  }

  remove(name: string, options: RemoveOptions = {}): Promise<void> {
    return this.serialized(async () => {
      const unavailable = this.unavailableDevices.get(name);
      const entry = this.entries.get(name);
      const order = [...this.entries.values()];
      if (unavailable === undefined) {
        const users = await this.deviceUsers(name);
        if (users.length > 0 && options.force !== true) {
          throw new BlockError(
            "EBUSY",
            `Device ${name} is in use (${users.join("; ")}): unmount it first, or remove with --force`,
          );
        }
        if (users.length > 0) this.logger.warn({ device: name, users }, "removing a device that is in use");
        await this.engine.removeDevice(name);
      }
      this.unavailableDevices.delete(name);
      this.entries.delete(name);
      this.cbtOutcomes.delete(name);
      await this.cbt.forget(name);
      try {
        await this.save();
      } catch (error) {
        this.restoreOrder(order);
        if (unavailable !== undefined) this.unavailableDevices.set(name, unavailable);
        else if (entry !== undefined) await this.reattach(entry);
        throw toBlockError(error, `device ${name} not removed: cannot save ${this.path}`);
      }
    });
  }

  /** Puts the entries back in their former order (the file lists devices in the order they were added). */
  private restoreOrder(order: readonly RegistryEntry[]): void {
    this.entries.clear();
    for (const entry of order) this.entries.set(entry.name, entry);
  }

  /** Attaches a removed device again (its file entry stayed); unavailable if its backend cannot be opened. */
  private async reattach(entry: RegistryEntry): Promise<void> {
    try {
      const writeIntent = this.cbt.intentFor(entry.name, entry.backendPath);
      try {
        await this.engine.addDevice({ ...entry, writeIntent });
      } catch (error) {
        this.cbt.release(entry.name);
        throw error;
      }
      await this.cbt.attach(entry.name, null);
    } catch (error) {
      const blockError = toBlockError(error, `device ${entry.name}`);
      this.unavailableDevices.set(entry.name, {
        name: entry.name,
        backendPath: entry.backendPath,
        error: { errno: blockError.errno, message: blockError.message },
      });
    }
  }

  private async save(): Promise<void> {
    const content = { version: 1 as const, devices: [...this.entries.values()] };
    await writeFileAtomic(this.path, `${JSON.stringify(content, null, 2)}\n`);
  }

  private serialized<T>(operation: () => Promise<T>): Promise<T> {
    const result = this.tail.then(operation, operation);
    this.tail = result.catch(() => {});
    return result;
  }
}

async function readRegistryFile(path: string): Promise<RegistryEntry[]> {
  let text: string;
  try {
    text = await readFile(path, "utf8");
  } catch (error) {
    if ((error as NodeJS.ErrnoException).code === "ENOENT") return [];
    throw toBlockError(error, `cannot read ${path}`);
  }
  let json: unknown;
  try {
    json = JSON.parse(text);
  } catch (error) {
    throw new BlockError(
      "EINVAL",
      `${path} is not valid JSON (fix or remove it): ${(error as Error).message}`,
    );
  }
  const parsed = registryFileSchema.safeParse(json);
  if (!parsed.success) {
    throw new BlockError(
      "EINVAL",
      `${path} is malformed (fix or remove it): ${z.prettifyError(parsed.error)}`,
    );
  }
  return parsed.data.devices;
}

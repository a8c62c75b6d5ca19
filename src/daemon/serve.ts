/**
 * Runs a Daemon as the process's main job: start, tell systemd it is ready (sd-notify.ts), then wait for
 * SIGINT or SIGTERM and stop cleanly (exit code 0).
 *
 * A stop never cuts off a mounted file system by surprise: while file systems are mounted on loop devices
 * over our FUSE files, the daemon logs at error level what is mounted, keeps serving, and waits until they
 * are unmounted — or until `stopWaitMs` passes, or a second signal arrives (the admin's "stop anyway").
 * Only then does the stop begin (its FUSE unmount is lazy, so such a file system sees I/O errors). systemd
 * sends one SIGTERM and, after TimeoutStopSec, SIGKILL; the unit from install-units sets TimeoutStopSec
 * above `--stop-wait` so the wait ends first. A signal during the stop itself, or a stop that takes longer
 * than stopTimeoutMs, exits at once with code 1 (the lock and socket files are then stale, and the next
 * start removes them).
 *
 * SIGHUP rereads the access rules (serve --access; Daemon.reloadAccess()): a bad file is logged and the
 * rules in force stay; without --access it is logged and ignored. Under --supervise the supervisor
 * forwards its SIGHUP to the engine, which does the same. A SIGHUP before the daemon is ready is ignored
 * (Node's default for SIGHUP would end the process).
 */
import type { LoopMount } from "../freeze/mount-discovery.js";
import type { Logger } from "../util/logger.js";
import { Daemon, type DaemonOptions } from "./daemon.js";
import { SdNotifier } from "./sd-notify.js";

const stopTimeoutMs = 30_000;
const mountPollIntervalMs = 1_000;

export interface ServeOptions extends DaemonOptions {
  /** How long a stop waits for file systems mounted on our devices to be unmounted. */
  readonly stopWaitMs: number;
}

/** Resolves with the exit code once the daemon has stopped. Start failures reject. */
export async function serveUntilSignal(options: ServeOptions): Promise<number> {
  const { logger } = options;
  const notifier = new SdNotifier(process.env, logger, options.supervised?.hello.supervisorPid);
  let started: Daemon | null = null;
  const onHangup = (): void => {
    if (started === null) {
      logger.warn("SIGHUP before the daemon is ready: ignored");
      return;
    }
    started.reloadAccess().then(
      () => {},
      (error: unknown) => {
        if ((error as { errno?: unknown }).errno === "ENOTSUP")
          logger.info("SIGHUP: no access file to reload");
      },
    );
  };
  process.on("SIGHUP", onHangup);
  // One SIGINT/SIGTERM listener for the whole run, installed before the start. The control socket answers
  // before Daemon.start() resolves, so a signal may come while the daemon starts: it is kept and acted on
  // once the start is done. Swapping an early listener for a later one lost such a signal: libuv hands a
  // caught signal to the handle that caught it, and a handle closed before the loop dispatched it drops
  // it, so a SIGTERM sent as the start finished left the daemon serving (seen in CI: a test that stopped
  // a daemon as soon as its status answered waited for its exit forever; an earlier CI failure had the
  // same symptom).
  let onStopSignal: ((signal: NodeJS.Signals) => void) | null = null;
  let earlySignal: NodeJS.Signals | null = null;
  const onSignal = (signal: NodeJS.Signals): void => {
    if (onStopSignal === null) earlySignal = signal;
    else onStopSignal(signal);
  };
  process.on("SIGINT", onSignal);
  process.on("SIGTERM", onSignal);
  const removeListeners = (): void => {
    process.off("SIGINT", onSignal);
    process.off("SIGTERM", onSignal);
    process.off("SIGHUP", onHangup);
  };
  let daemon: Daemon;
  try {
    daemon = await Daemon.start(options);
  } catch (error) {
    removeListeners();
    throw error;
  }
  started = daemon;
  void notifier.notify({ READY: "1", STATUS: "serving" });
  const { stopWaitMs } = options;
  return await new Promise<number>((resolve) => {
    let phase: "serving" | "waiting for unmount" | "stopping" = "serving";
    let releaseWait: (() => void) | null = null;
    onStopSignal = (signal: NodeJS.Signals): void => {
      if (phase === "stopping") {
        logger.warn({ signal }, "second signal during stop: exiting now");
        process.exit(1);
      }
      if (phase === "waiting for unmount") {
        logger.warn({ signal }, "second signal: stopping although file systems are still mounted");
        releaseWait?.();
        return;
      }
      logger.info({ signal }, "signal received");
      phase = "waiting for unmount";
      const waited = new Promise<void>((release) => {
        releaseWait = release;
      });
      void waitForUnmount(daemon, logger, notifier, stopWaitMs, waited)
        .then(async () => {
          phase = "stopping";
          await notifier.notify({ STOPPING: "1", STATUS: "stopping" });
          await stopWithTimeout(daemon, logger);
        })
        .then(
          () => {
            removeListeners();
            resolve(0);
          },
          () => resolve(1),
        );
    };
    if (earlySignal !== null) onStopSignal(earlySignal);
  });
}

/** Resolves once nothing is mounted on our devices, `stopWaitMs` passed, or `released` resolved. */
async function waitForUnmount(
  daemon: Daemon,
  logger: Logger,
  notifier: SdNotifier,
  stopWaitMs: number,
  released: Promise<void>,
): Promise<void> {
  let mounts = daemon.mountedFileSystems();
  if (mounts.length === 0) return;
  logger.error(
    { mounted: mounts.map(describeMount), stopWaitMs },
    "stop requested while file systems are mounted on blocksnap devices: still serving until they are unmounted (a second signal stops anyway, and their writes then fail)",
  );
  let stillWaiting = true;
  void released.then(() => {
    stillWaiting = false;
  });
  const deadline = Date.now() + stopWaitMs;
  while (stillWaiting && mounts.length > 0) {
    if (Date.now() >= deadline) {
      logger.error(
        { mounted: mounts.map(describeMount), stopWaitMs },
        "file systems are still mounted after the stop wait: stopping anyway, their writes will fail",
      );
      return;
    }
    void notifier.notify({
      STATUS: `stopping: waiting for ${mounts.length} mounted file system(s): ${mounts.map((mount) => mount.mountPoint).join(", ")}`,
    });
    await Promise.race([released, new Promise((wake) => setTimeout(wake, mountPollIntervalMs))]);
    mounts = daemon.mountedFileSystems();
  }
  if (mounts.length === 0) logger.info("the file systems on blocksnap devices are unmounted: stopping");
}

function describeMount(mount: LoopMount): string {
  return `${mount.mountPoint} (${mount.fsType} on ${mount.loopDevice} over ${mount.backingFile})`;
}

async function stopWithTimeout(daemon: Daemon, logger: Logger): Promise<void> {
  let timer: NodeJS.Timeout | undefined;
  const timedOut = new Promise<never>((_resolve, reject) => {
    timer = setTimeout(() => {
      logger.error({ stopTimeoutMs }, "daemon did not stop in time");
      reject(new Error("stop timed out"));
    }, stopTimeoutMs);
    timer.unref();
  });
  try {
    await Promise.race([daemon.stop(), timedOut]);
  } finally {
    clearTimeout(timer);
  }
}

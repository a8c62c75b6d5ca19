/**
 * Runs a Daemon as the process's main job: start, then wait for SIGINT or SIGTERM and stop cleanly
 * (exit code 0). A second signal during the stop, or a stop that takes longer than stopTimeoutMs, exits
 * at once with code 1 (the lock and socket files are then stale, and the next start removes them).
 */
import type { Logger } from "../util/logger.js";
import { Daemon, type DaemonOptions } from "./daemon.js";

const stopTimeoutMs = 30_000;

/** Resolves with the exit code once the daemon has stopped. Start failures reject. */
export async function serveUntilSignal(options: DaemonOptions): Promise<number> {
  const daemon = await Daemon.start(options);
  return await new Promise<number>((resolve) => {
    let signalCount = 0;
    const onSignal = (signal: NodeJS.Signals): void => {
      signalCount++;
      if (signalCount > 1) {
        options.logger.warn({ signal }, "second signal during stop: exiting now");
        process.exit(1);
      }
      options.logger.info({ signal }, "signal received");
      stopWithTimeout(daemon, options.logger).then(
        () => {
          process.off("SIGINT", onSignal);
          process.off("SIGTERM", onSignal);
          resolve(0);
        },
        () => resolve(1),
      );
    };
    process.on("SIGINT", onSignal);
    process.on("SIGTERM", onSignal);
  });
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

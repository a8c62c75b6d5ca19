/**
 * The logging surface every module takes: a subset of pino's Logger, so the daemon passes its pino
 * instance and tests and library users pass nothing (silentLogger). Hot paths log at debug level only.
 */
export interface LogFn {
  (message: string): void;
  (fields: object, message?: string): void;
}

export interface Logger {
  readonly debug: LogFn;
  readonly info: LogFn;
  readonly warn: LogFn;
  readonly error: LogFn;
}

const noop: LogFn = () => {};

export const silentLogger: Logger = { debug: noop, info: noop, warn: noop, error: noop };

/** pino's level names, most severe first; `silent` logs nothing. */
export const logLevelNames = ["fatal", "error", "warn", "info", "debug", "trace", "silent"] as const;
export type LogLevelName = (typeof logLevelNames)[number];

/** The daemon's log level, changeable while it runs (`blocksnap log-level`). */
export interface LogLevelControl {
  get(): LogLevelName;
  set(level: LogLevelName): void;
}

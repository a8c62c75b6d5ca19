/**
 * Where and how `blocksnap serve` logs (pino): three outputs, chosen once at start.
 * - `--json`: JSON lines on stdout — the start-up report ("blocksnap daemon ready", with the sockets, the
 *   state dir and who can connect) and every log line after it, for a program that reads the daemon.
 * - stderr is a terminal: one human line per record on stderr — local time, level, message, then the
 *   record's own fields as `key=value` (pid and hostname left out); the level is coloured unless NO_COLOR
 *   is set. A line that is not pino's JSON is passed on as it is.
 * - otherwise (systemd's journal, a pipe, a file): JSON lines on stderr, as pino writes them.
 * Writes are synchronous (a log line is never lost at exit or a crash). The level can change at run time
 * (`blocksnap log-level`): pino filters before the stream, so the outputs need not know it.
 */
import { writeSync } from "node:fs";
import { type DestinationStream, type Level, type Logger, pino } from "pino";
import type { LogLevelControl, LogLevelName } from "../util/logger.js";

export type LogOutput = "json-stdout" | "pretty-stderr" | "json-stderr";

export function chooseLogOutput(json: boolean, stderrIsTerminal: boolean): LogOutput {
  if (json) return "json-stdout";
  return stderrIsTerminal ? "pretty-stderr" : "json-stderr";
}

export function createDaemonLogger(level: LogLevelName, output: LogOutput): Logger {
  if (output === "json-stdout") return pino({ level }, pino.destination({ dest: 1, sync: true }));
  if (output === "json-stderr") return pino({ level }, pino.destination({ dest: 2, sync: true }));
  const color = process.env.NO_COLOR === undefined || process.env.NO_COLOR === "";
  const stream: DestinationStream = {
    write: (line: string) => {
      writeSync(2, `${formatLogLine(line, color)}\n`);
    },
  };
  return pino({ level }, stream);
}

/** The pino logger's level as the daemon's control API changes it. */
export function levelControlOf(logger: Logger): LogLevelControl {
  return {
    get: () => logger.level as LogLevelName,
    set: (level) => {
      logger.level = level;
    },
  };
}

const levelNames: Readonly<Record<number, Level>> = {
  10: "trace",
  20: "debug",
  30: "info",
  40: "warn",
  50: "error",
  60: "fatal",
};

/** ANSI colours per level: errors red, warnings yellow, info green, debug and trace dim. */
const levelColors: Readonly<Record<Level, string>> = {
  fatal: "\u001b[1;31m",
  error: "\u001b[31m",
  warn: "\u001b[33m",
  info: "\u001b[32m",
  debug: "\u001b[2m",
  trace: "\u001b[2m",
};
const colorReset = "\u001b[0m";

/** Fields every record has, already shown in front or of no use on a terminal. */
const omittedFields = new Set(["level", "time", "msg", "pid", "hostname"]);

/** One pino JSON line → `HH:MM:SS.mmm LEVEL message key=value …` (no trailing newline). */
export function formatLogLine(line: string, color: boolean): string {
  const text = line.trimEnd();
  let record: Record<string, unknown>;
  try {
    const parsed: unknown = JSON.parse(text);
    if (typeof parsed !== "object" || parsed === null || Array.isArray(parsed)) return text;
    record = parsed as Record<string, unknown>;
  } catch {
    return text;
  }
  const level = levelNames[Number(record.level)] ?? "info";
  const time = typeof record.time === "number" ? formatLocalTime(new Date(record.time)) : "--:--:--.---";
  const label = level.toUpperCase().padEnd(5);
  const shownLevel = color ? `${levelColors[level]}${label}${colorReset}` : label;
  const fields = Object.entries(record)
    .filter(([key, value]) => !omittedFields.has(key) && value !== undefined)
    .map(([key, value]) => `${key}=${formatValue(value)}`);
  const message = typeof record.msg === "string" ? record.msg : "";
  return [time, shownLevel, message, ...fields].filter((part) => part !== "").join(" ");
}

function formatLocalTime(date: Date): string {
  const two = (value: number): string => String(value).padStart(2, "0");
  return `${two(date.getHours())}:${two(date.getMinutes())}:${two(date.getSeconds())}.${String(date.getMilliseconds()).padStart(3, "0")}`;
}

/** Plain words stay bare; anything with spaces or quotes, and objects, as JSON. An error shows its message. */
function formatValue(value: unknown): string {
  if (typeof value === "string") return /^[^\s"=]+$/.test(value) ? value : JSON.stringify(value);
  if (
    typeof value === "object" &&
    value !== null &&
    typeof (value as { message?: unknown }).message === "string"
  ) {
    return JSON.stringify((value as { message: string }).message);
  }
  return JSON.stringify(value) ?? String(value);
}

/**
 * Test helpers for the metrics endpoint: a scrape over the control socket (or TCP), parsed by real
 * Prometheus parsers — promtool's `check metrics` (Debian `prometheus`) for the format and the naming
 * conventions, and the Python client's parser (Debian `python3-prometheus-client`) for the values. Each
 * returns a reason string when its tool is absent, so a test can skip with it.
 */
import assert from "node:assert/strict";
import { existsSync } from "node:fs";
import { request as httpRequest } from "node:http";
import { runCommand } from "../cli/cli-harness.js";

export interface HttpAnswer {
  readonly status: number;
  readonly contentType: string | undefined;
  readonly body: string;
}

/** One GET, over a Unix socket (`socketPath`) or TCP (`host`, `port`). Bounded by a timeout. */
export function httpGet(
  where: { readonly socketPath: string } | { readonly host: string; readonly port: number },
  path: string,
  method = "GET",
): Promise<HttpAnswer> {
  return new Promise((resolve, reject) => {
    const request = httpRequest({ ...where, path, method, agent: false, timeout: 30_000 }, (response) => {
      let body = "";
      response.setEncoding("utf8").on("data", (text: string) => {
        body += text;
      });
      response.once("end", () =>
        resolve({ status: response.statusCode ?? 0, contentType: response.headers["content-type"], body }),
      );
    });
    request.once("timeout", () => request.destroy(new Error(`GET ${path} timed out`)));
    request.once("error", reject);
    request.end();
  });
}

export interface Sample {
  readonly name: string;
  readonly labels: Readonly<Record<string, string>>;
  readonly value: number;
}

const python = existsSync("/usr/bin/python3") ? "/usr/bin/python3" : "python3";
const parserScript = `
import json, math, sys
try:
    from prometheus_client.parser import text_string_to_metric_families
except ImportError:
    print("ABSENT"); sys.exit(0)
out = []
for family in text_string_to_metric_families(sys.stdin.read()):
    for s in family.samples:
        v = s.value
        out.append([s.name, s.labels, "+Inf" if v == math.inf else v])
print(json.dumps(out))
`;

/** The samples of `text` as the Python client's parser reads them; a string: why it cannot run. */
export async function parseWithPrometheusClient(text: string): Promise<Sample[] | string> {
  let result: Awaited<ReturnType<typeof runCommand>>;
  try {
    result = await runCommand(python, ["-c", parserScript], { input: text });
  } catch {
    return "python3 is not installed";
  }
  if (result.stdout.trim() === "ABSENT") {
    return "python3-prometheus-client is not installed (apt-get install python3-prometheus-client)";
  }
  assert.equal(result.code, 0, `the Prometheus parser refused the scrape: ${result.stderr}`);
  const rows = JSON.parse(result.stdout) as [string, Record<string, string>, number | string][];
  return rows.map(([name, labels, value]) => ({
    name,
    labels,
    value: value === "+Inf" ? Number.POSITIVE_INFINITY : Number(value),
  }));
}

/** promtool's verdict on `text` (format and naming lint): "" when clean; null when promtool is absent. */
export async function promtoolProblems(text: string): Promise<string | null> {
  try {
    const result = await runCommand("promtool", ["check", "metrics"], { input: text });
    return result.code === 0 ? "" : `${result.stdout}${result.stderr}`.trim() || `exit ${result.code}`;
  } catch {
    return null;
  }
}

/** The value of the sample named `name` with exactly these labels; 0 when there is none. */
export function sampleValue(
  samples: readonly Sample[],
  name: string,
  labels: Record<string, string>,
): number {
  return samples.find((sample) => sample.name === name && sameLabels(sample.labels, labels))?.value ?? 0;
}

/** Whether a sample named `name` with exactly these labels exists. */
export function hasSample(samples: readonly Sample[], name: string, labels: Record<string, string>): boolean {
  return samples.some((sample) => sample.name === name && sameLabels(sample.labels, labels));
}

function sameLabels(actual: Readonly<Record<string, string>>, expected: Record<string, string>): boolean {
  const keys = Object.keys(actual);
  return keys.length === Object.keys(expected).length && keys.every((key) => actual[key] === expected[key]);
}

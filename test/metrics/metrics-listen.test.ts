/**
 * `serve --metrics-listen`: a TCP listener that answers GET /metrics with the same exposition as the
 * control socket, and nothing else of the API (404 for other paths, 405 for other methods); the
 * `blocksnap metrics` command prints the same text. Also: the names the docs list are the names a scrape
 * shows (docs/metrics.md stays complete).
 */
import assert from "node:assert/strict";
import { mkdtemp, readFile, rm } from "node:fs/promises";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { after, before, test } from "node:test";
import type { StatusView } from "../../src/daemon/api-types.js";
import { exposition } from "../../src/metrics/text-format.js";
import { DaemonProcess } from "../cli/cli-harness.js";
import { httpGet, parseWithPrometheusClient, promtoolProblems } from "./scrape.js";

let directory = "";

before(async () => {
  directory = await mkdtemp(join(tmpdir(), "blocksnap-metrics-listen-"));
});

after(async () => {
  await rm(directory, { recursive: true, force: true });
});

/** The port the daemon logged for --metrics-listen 127.0.0.1:0. */
function loggedMetricsPort(stderr: string): number {
  const line = stderr.split("\n").find((text) => text.includes('"metricsTcp"'));
  assert.ok(line !== undefined, `the daemon logs its metrics address:\n${stderr}`);
  const address = (JSON.parse(line) as { metricsTcp: string }).metricsTcp;
  return Number(address.slice(address.lastIndexOf(":") + 1));
}

void test("--metrics-listen serves GET /metrics over TCP and refuses every other path and method", async () => {
  const daemon = await DaemonProcess.start(join(directory, "tcp"), {
    args: ["--nbd-listen", "none", "--fuse-mount", "none", "--metrics-listen", "127.0.0.1:0"],
  });
  try {
    await daemon.cliOk(["device", "add", "m0", "--backend", "memory:", "--size", "1M"]);
    const port = loggedMetricsPort(daemon.stderr);
    const where = { host: "127.0.0.1", port };
    const scraped = await httpGet(where, "/metrics");
    assert.equal(scraped.status, 200);
    assert.equal(scraped.contentType, exposition.contentType);
    assert.match(scraped.body, /^blocksnap_device_size_bytes\{device="m0"\} 1048576$/m);
    const problems = await promtoolProblems(scraped.body);
    if (problems === null) console.log("# promtool is absent (Debian package prometheus): lint skipped");
    else assert.equal(problems, "", problems);
    assert.equal((await httpGet(where, "/metrics?x=1")).status, 200);
    assert.equal((await httpGet(where, "/metrics", "HEAD")).status, 200);
    // Nothing of the control API on TCP.
    for (const path of ["/", "/v1/status", "/v1/devices", "/metrics/", "/metricsx", "//metrics"]) {
      assert.equal((await httpGet(where, path)).status, 404, path);
    }
    const post = await httpGet(where, "/metrics", "POST");
    assert.equal(post.status, 405);
    assert.equal((await httpGet(where, "/v1/devices", "POST")).status, 404);
    // Same families on the control socket, where the API is.
    const status = await httpGet({ socketPath: daemon.controlSocket }, "/v1/status");
    assert.equal((JSON.parse(status.body) as StatusView).devices.length, 1);
    // `blocksnap metrics` prints the exposition.
    const printed = await daemon.cliOk(["metrics"]);
    assert.match(printed, /^# TYPE blocksnap_io_requests_total counter$/m);
    assert.match(printed, /^blocksnap_io_requests_total\{device="m0",op="write"\} 0$/m);
    const asJson = await daemon.cliJson<{ text: string }>(["metrics"]);
    assert.match(asJson.text, /^blocksnap_build_info\{version="[^"]+"\} 1$/m);
  } finally {
    await daemon.stop();
  }
});

void test("--metrics-listen on an address in use fails the start with a clear message", async () => {
  const first = await DaemonProcess.start(join(directory, "first"), {
    args: ["--nbd-listen", "none", "--fuse-mount", "none", "--metrics-listen", "127.0.0.1:0"],
  });
  try {
    const port = loggedMetricsPort(first.stderr);
    const { runCli } = await import("../cli/cli-harness.js");
    const second = await runCli([
      "serve",
      "--state-dir",
      join(directory, "second"),
      "--nbd-listen",
      "none",
      "--fuse-mount",
      "none",
      "--metrics-listen",
      `127.0.0.1:${port}`,
    ]);
    assert.equal(second.code, 1);
    assert.match(second.stderr, /metrics address 127\.0\.0\.1:\d+ is already in use/);
  } finally {
    await first.stop();
  }
});

void test("docs/metrics.md lists every metric family a scrape shows, and no other", async (t) => {
  const daemon = await DaemonProcess.start(join(directory, "docs"));
  try {
    await daemon.cliOk(["device", "add", "d0", "--backend", "memory:", "--size", "1M"]);
    const id = (
      await daemon.cliOk(["snapshot", "create", "--storage", "memory:", "--limit", "4M", "--device", "d0"])
    ).trim();
    await daemon.cliOk(["snapshot", "take", id, "--no-freeze"]);
    const text = (await httpGet({ socketPath: daemon.controlSocket }, "/metrics")).body;
    const samples = await parseWithPrometheusClient(text);
    if (typeof samples === "string") return t.skip(samples);
    const families = new Set([...text.matchAll(/^# TYPE (\S+) /gm)].map((match) => match[1]!));
    const docs = await readFile(new URL("../../../docs/metrics.md", import.meta.url), "utf8");
    const documented = new Set(
      [...docs.matchAll(/^\| `((?:blocksnap|process)_[a-z_]+)(?:\{[^}]*\})?` \|/gm)].map(
        (match) => match[1]!,
      ),
    );
    assert.deepEqual([...families].sort(), [...documented].sort());
  } finally {
    await daemon.stop();
  }
});

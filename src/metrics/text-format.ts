/**
 * The Prometheus text exposition format, version 0.0.4 (what every Prometheus server and promtool read):
 * `# HELP` and `# TYPE` once per family, then one `name{label="value",…} value` line per sample, label
 * values escaped (backslash, double quote, newline), numbers as Go prints them (+Inf, -Inf, NaN).
 *
 * The writer builds the whole answer as one string: a scrape is small (a few lines per device, per
 * snapshot and per operation). It checks that a family is declared once and that every sample belongs to
 * the family declared last, so a mistake shows as an assertion in the tests, not as a scrape that
 * Prometheus refuses.
 */
import { assert } from "../util/assert.js";

export const exposition = {
  contentType: "text/plain; version=0.0.4; charset=utf-8",
} as const;

export type MetricType = "counter" | "gauge" | "histogram" | "summary" | "untyped";

/** Label name → value, in the order they are printed. */
export type Labels = Readonly<Record<string, string>>;

const metricNamePattern = /^[a-zA-Z_:][a-zA-Z0-9_:]*$/;
const labelNamePattern = /^[a-zA-Z_][a-zA-Z0-9_]*$/;

export class TextWriter {
  private readonly lines: string[] = [];
  private readonly declared = new Set<string>();
  private current: { name: string; type: MetricType } | null = null;

  /** Declares a family; its samples follow. */
  family(name: string, type: MetricType, help: string): this {
    assert(metricNamePattern.test(name), `metric name ${name}`);
    assert(!this.declared.has(name), `metric family ${name} is declared once`);
    this.declared.add(name);
    this.current = { name, type };
    this.lines.push(`# HELP ${name} ${escapeHelp(help)}`, `# TYPE ${name} ${type}`);
    return this;
  }

  /**
   * One sample of the current family: `suffix` is "" or, for histograms, `_bucket`, `_sum`, `_count`.
   */
  sample(labels: Labels, value: number, suffix = ""): this {
    const family = this.current;
    assert(family !== null, "a sample follows its family");
    assert(
      suffix === "" || (family.type === "histogram" && ["_bucket", "_sum", "_count"].includes(suffix)),
      `suffix ${suffix} of ${family.name}`,
    );
    this.lines.push(`${family.name}${suffix}${formatLabels(labels)} ${formatValue(value)}`);
    return this;
  }

  /**
   * A whole histogram sample set: cumulative counts per upper bound (the last one is +Inf, so it equals
   * the count), and the sum.
   */
  histogram(
    labels: Labels,
    boundsSeconds: readonly number[],
    cumulative: readonly number[],
    sum: number,
  ): this {
    assert(cumulative.length === boundsSeconds.length + 1, "one count per bound and +Inf");
    for (const [index, count] of cumulative.entries()) {
      const bound = index < boundsSeconds.length ? formatValue(boundsSeconds[index]!) : "+Inf";
      this.sample({ ...labels, le: bound }, count, "_bucket");
    }
    this.sample(labels, sum, "_sum");
    this.sample(labels, cumulative[cumulative.length - 1] ?? 0, "_count");
    return this;
  }

  text(): string {
    return this.lines.length === 0 ? "" : `${this.lines.join("\n")}\n`;
  }
}

function formatLabels(labels: Labels): string {
  const entries = Object.entries(labels);
  if (entries.length === 0) return "";
  const parts = entries.map(([name, value]) => {
    assert(labelNamePattern.test(name) && !name.startsWith("__"), `label name ${name}`);
    return `${name}="${escapeLabelValue(value)}"`;
  });
  return `{${parts.join(",")}}`;
}

function escapeLabelValue(value: string): string {
  return value.replace(/\\/g, "\\\\").replace(/"/g, '\\"').replace(/\n/g, "\\n");
}

function escapeHelp(help: string): string {
  return help.replace(/\\/g, "\\\\").replace(/\n/g, "\\n");
}

export function formatValue(value: number): string {
  if (Number.isNaN(value)) return "NaN";
  if (value === Number.POSITIVE_INFINITY) return "+Inf";
  if (value === Number.NEGATIVE_INFINITY) return "-Inf";
  return String(value);
}

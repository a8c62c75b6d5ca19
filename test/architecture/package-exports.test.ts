/**
 * The library API is what package.json `exports` lists (docs/library.md), not all of src/: every listed
 * entry point loads through the package's own name, and a module that is not listed cannot be imported.
 */
import assert from "node:assert/strict";
import { readFileSync } from "node:fs";
import { test } from "node:test";

interface PackageJson {
  readonly name: string;
  readonly exports: Readonly<Record<string, unknown>>;
}

const packageJson = JSON.parse(readFileSync("package.json", "utf8")) as PackageJson;

test("package exports: an explicit list, every entry loads by the package's name", async () => {
  const keys = Object.keys(packageJson.exports);
  assert.ok(!keys.some((key) => key.includes("*")), `no wildcard exports: ${keys}`);
  for (const key of keys) {
    if (key === "./package.json") continue;
    const specifier = key === "." ? packageJson.name : `${packageJson.name}/${key.slice(2)}`;
    await assert.doesNotReject(import(specifier), `import ${specifier}`);
  }
  const engine = (await import(packageJson.name)) as Record<string, unknown>;
  assert.equal(typeof engine.Engine, "function");
});

test("package exports: internal modules are not reachable", async () => {
  await assert.rejects(
    import(`${packageJson.name}/daemon/daemon`),
    (error: unknown) => (error as { code?: string }).code === "ERR_PACKAGE_PATH_NOT_EXPORTED",
  );
});

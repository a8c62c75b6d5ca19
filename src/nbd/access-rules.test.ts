import assert from "node:assert/strict";
import { test } from "node:test";
import { BlockError } from "../block/errors.js";
import { accessRulesMax, allowAll, globMatches, parseAccessRules } from "./access-rules.js";

const example = [
  "# who may use what",
  "backup   disk*@*  ro   # snapshot images of disk0, disk1...",
  "backup   secret*  none",
  "backup   disk?    ro",
  "admin    *        rw",
  "admin    *@*      ro",
  "*        public   ro",
  "-        local*   rw",
  "",
].join("\n");

test("access rules: first match decides, `*` is any authenticated identity, `-` the anonymous client", () => {
  const rules = parseAccessRules(example, "access.conf");
  assert.equal(rules.rules.length, 7);
  assert.deepEqual(rules.rules[0], { identity: "backup", exportGlob: "disk*@*", grant: "ro", line: 2 });
  assert.equal(rules.grantFor("backup", "disk0@1a2b"), "ro");
  assert.equal(rules.grantFor("backup", "disk0"), "ro", "disk? matches the origin disk0");
  assert.equal(rules.grantFor("backup", "disk10"), "none", "? is exactly one character");
  assert.equal(rules.grantFor("backup", "secret1"), "none");
  assert.equal(rules.grantFor("backup", "other"), "none", "no matching rule: none");
  assert.equal(rules.grantFor("admin", "anything"), "rw");
  assert.equal(rules.grantFor("admin", "anything@snap"), "ro", "* does not cross @");
  assert.equal(rules.grantFor("carol", "public"), "ro", "* matches any authenticated identity");
  assert.equal(rules.grantFor(null, "public"), "none", "* does not match a client without identity");
  assert.equal(rules.grantFor(null, "local0"), "rw", "- is the client without identity");
  assert.equal(rules.grantFor("-", "local0"), "none", "a PSK identity spelled - is not anonymous");
  assert.equal(allowAll.grantFor(null, "x"), "rw");
});

test("access rules: the order matters (first match, not most specific)", () => {
  const broadFirst = parseAccessRules("u * rw\nu disk0 ro\n", "f");
  assert.equal(broadFirst.grantFor("u", "disk0"), "rw");
  const narrowFirst = parseAccessRules("u disk0 ro\nu * rw\n", "f");
  assert.equal(narrowFirst.grantFor("u", "disk0"), "ro");
});

test("access rules: a bad line is one error naming the file and line", () => {
  const cases: [string, RegExp][] = [
    ["ok * rw\nbackup disk0\n", /^f:2: expected IDENTITY EXPORT-GLOB ro\|rw\|none, got 2 field/],
    ["backup disk0 ro extra\n", /^f:1: .*got 4 field/],
    ["backup disk0 write\n", /^f:1: grant "write": expected ro, rw or none$/],
    ["\n\nbackup disk/0 ro\n", /^f:3: export glob "disk\/0": only/],
    ["backup a@b@c ro\n", /^f:1: export glob "a@b@c": more than one @$/],
    ["backup [ab] ro\n", /^f:1: export glob/],
    ["back\u0001up disk ro\n", /^f:1: the identity holds a control character$/],
    [`u ${"a".repeat(5000)} ro\n`, /^f:1: line longer than/],
  ];
  for (const [text, expected] of cases) {
    assert.throws(
      () => parseAccessRules(text, "f"),
      (error: unknown) => {
        assert.ok(error instanceof BlockError);
        assert.equal(error.errno, "EINVAL");
        assert.match(error.message, expected);
        assert.doesNotMatch(error.message, /\n/, "one line");
        return true;
      },
      JSON.stringify(text.slice(0, 40)),
    );
  }
});

test("access rules: comments, blank lines, CRLF and an empty file", () => {
  const rules = parseAccessRules("# only comments\r\n\r\n  u d rw\r\n\t# indented comment\n", "f");
  assert.equal(rules.rules.length, 1);
  assert.deepEqual(rules.rules[0], { identity: "u", exportGlob: "d", grant: "rw", line: 3 });
  const empty = parseAccessRules("", "f");
  assert.equal(empty.rules.length, 0);
  assert.equal(empty.grantFor("u", "d"), "none", "an empty file denies everything");
});

test("access rules: bounded rule count", () => {
  const text = "u d ro\n".repeat(accessRulesMax + 1);
  assert.throws(() => parseAccessRules(text, "f"), new RegExp(`^BlockError: f:${accessRulesMax + 1}: more`));
});

test("globMatches agrees with a regular-expression reference on random names", () => {
  const reference = (glob: string, name: string): boolean => {
    const source = [...glob]
      .map((character) =>
        character === "*" ? "[^@]*" : character === "?" ? "[^@]" : character.replace(/[.-]/g, "\\$&"),
      )
      .join("");
    return new RegExp(`^${source}$`).test(name);
  };
  const alphabet = ["a", "b", "@", "."];
  const globAlphabet = [...alphabet, "*", "?"];
  let seed = 12345;
  const random = (count: number): number => {
    seed = (seed * 1103515245 + 12345) % 2 ** 31;
    return seed % count;
  };
  const randomString = (letters: readonly string[], lengthMax: number): string =>
    Array.from({ length: random(lengthMax + 1) }, () => letters[random(letters.length)]).join("");
  for (let round = 0; round < 20_000; round++) {
    const glob = randomString(globAlphabet, 6);
    const name = randomString(alphabet, 8);
    assert.equal(globMatches(glob, name), reference(glob, name), `${JSON.stringify(glob)} vs ${name}`);
  }
  assert.equal(globMatches("disk*@*", "disk0@2024-01"), true);
  assert.equal(globMatches("disk*@*", "disk0"), false);
  assert.equal(globMatches("*", ""), true);
});

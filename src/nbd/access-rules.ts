/**
 * Access rules of the NBD face (serve --access FILE): which identity may use which export, read-only or
 * read-write. Pure: parsing and the decision, no I/O; the daemon reads the file and swaps rule sets on a
 * reload (src/daemon/access-file.ts), the handshake asks grantFor() (handshake.ts).
 *
 * The file: one rule per line, `IDENTITY EXPORT-GLOB GRANT`, fields separated by blanks; blank lines and
 * `#` comments (a whole line, or from a field that starts with `#`) are ignored.
 *   IDENTITY     a PSK identity, or the CN of an X.509 client certificate verified with --tls-verify-peer;
 *                `*` any identity that TLS authenticated; `-` a client without one (plain text, or TLS
 *                without a verified client certificate).
 *   EXPORT-GLOB  `*` matches any run of characters and `?` one character, but neither matches `@`, the
 *                separator of snapshot images (`<device>@<snapshot-id>`): `disk*` is the devices disk0,
 *                disk1…, `disk*@*` their snapshot images, `*` every device and `*@*` every image. Other
 *                characters are literal and must be ones an export name can hold ([A-Za-z0-9._-] and `@`).
 *   GRANT        `rw`, `ro` (reads only: NBD_FLAG_READ_ONLY, writes answered EPERM) or `none` (denied).
 * The first rule that matches both the identity and the export decides; no rule matching means `none`.
 * First match, not most specific: the order is the whole story, as in a firewall, so a reader never has to
 * rank globs. Put the exceptions first (`backup secret* none` before `backup * ro`).
 *
 * Without an access file every client may use every export (allowAll). With one, it governs every
 * connection, plain-text ones included: those match only `-` rules, so an access file without `-` lines
 * closes the exports to clients without TLS.
 *
 * Strict parsing: any bad line is an error naming its line number (`FILE:N: …`) and nothing of the file
 * is used. Bounded: the file size, the line count and the rule count have limits; matching is a linear
 * two-pointer glob match (no backtracking blow-up).
 */
import { BlockError } from "../block/errors.js";

export type Grant = "none" | "ro" | "rw";

/** The identity of a client that TLS did not authenticate (plain text, or no verified client certificate). */
export const anonymousIdentity = "-";
/** In a rule: any identity that TLS authenticated (not `-`). */
export const anyAuthenticatedIdentity = "*";

export interface AccessRule {
  readonly identity: string;
  readonly exportGlob: string;
  readonly grant: Grant;
  /** 1-based line in the file. */
  readonly line: number;
}

export interface AccessPolicy {
  /** `identity` null: no TLS identity. */
  grantFor(identity: string | null, exportName: string): Grant;
}

/** No access file: every client may use every export (the export's own read-only flag still holds). */
export const allowAll: AccessPolicy = { grantFor: () => "rw" };

export const accessFileBytesMax = 1024 * 1024;
export const accessRulesMax = 10_000;
const lineCharsMax = 4096;
const grants: ReadonlySet<string> = new Set(["none", "ro", "rw"]);
const globPattern = /^[A-Za-z0-9._\-@*?]+$/;
const identityPattern = /^[\x21-\x7e\u0080-\uffff]+$/;

export class AccessRules implements AccessPolicy {
  readonly rules: readonly AccessRule[];

  constructor(rules: readonly AccessRule[]) {
    this.rules = rules;
  }

  grantFor(identity: string | null, exportName: string): Grant {
    for (const rule of this.rules) {
      if (identityMatches(rule.identity, identity) && globMatches(rule.exportGlob, exportName)) {
        return rule.grant;
      }
    }
    return "none";
  }
}

/** Parses an access file; throws a BlockError EINVAL `where:LINE: why` at the first bad line. */
export function parseAccessRules(text: string, where: string): AccessRules {
  if (Buffer.byteLength(text, "utf8") > accessFileBytesMax) {
    throw new BlockError("EINVAL", `${where}: larger than ${accessFileBytesMax} bytes`);
  }
  const rules: AccessRule[] = [];
  const lines = text.split("\n");
  for (const [index, rawLine] of lines.entries()) {
    const line = index + 1;
    const fail = (why: string): never => {
      throw new BlockError("EINVAL", `${where}:${line}: ${why}`);
    };
    if (rawLine.length > lineCharsMax) fail(`line longer than ${lineCharsMax} characters`);
    // A file written on Windows keeps working; any other control character is an error below.
    const content = rawLine.endsWith("\r") ? rawLine.slice(0, -1) : rawLine;
    const fields: string[] = [];
    for (const field of content.split(/[ \t]+/)) {
      if (field === "") continue;
      if (field.startsWith("#")) break;
      fields.push(field);
    }
    if (fields.length === 0) continue;
    if (fields.length !== 3) {
      fail(`expected IDENTITY EXPORT-GLOB ro|rw|none, got ${fields.length} field(s)`);
    }
    const [identity, exportGlob, grant] = fields as [string, string, string];
    if (!identityPattern.test(identity)) fail("the identity holds a control character");
    if (!globPattern.test(exportGlob)) {
      fail(
        `export glob ${JSON.stringify(exportGlob)}: only A-Z a-z 0-9 . _ - @ and the wildcards * ? are allowed`,
      );
    }
    if (exportGlob.split("@").length > 2) fail(`export glob ${JSON.stringify(exportGlob)}: more than one @`);
    if (!grants.has(grant)) fail(`grant ${JSON.stringify(grant)}: expected ro, rw or none`);
    if (rules.length >= accessRulesMax) fail(`more than ${accessRulesMax} rules`);
    rules.push({ identity, exportGlob, grant: grant as Grant, line });
  }
  return new AccessRules(rules);
}

function identityMatches(ruleIdentity: string, identity: string | null): boolean {
  // `-` and `*` are keywords: a PSK identity spelled that way is matched by `*` only.
  if (identity === null || ruleIdentity === anonymousIdentity) {
    return identity === null && ruleIdentity === anonymousIdentity;
  }
  if (ruleIdentity === anyAuthenticatedIdentity) return true;
  return ruleIdentity === identity;
}

/**
 * `*` any run and `?` one character, neither across `@`. Linear two-pointer matching: on a mismatch after
 * a `*`, retry one character further; a `@` in the name ends what that `*` may swallow.
 */
export function globMatches(glob: string, name: string): boolean {
  let globIndex = 0;
  let nameIndex = 0;
  let starGlobIndex = -1;
  let starNameIndex = 0;
  while (nameIndex < name.length) {
    const pattern = glob[globIndex];
    const character = name[nameIndex];
    if (pattern === "*") {
      starGlobIndex = globIndex;
      starNameIndex = nameIndex;
      globIndex += 1;
    } else if (pattern !== undefined && (pattern === character || (pattern === "?" && character !== "@"))) {
      globIndex += 1;
      nameIndex += 1;
    } else if (starGlobIndex >= 0 && name[starNameIndex] !== "@") {
      starNameIndex += 1;
      nameIndex = starNameIndex;
      globIndex = starGlobIndex + 1;
    } else {
      return false;
    }
  }
  while (glob[globIndex] === "*") globIndex += 1;
  return globIndex === glob.length;
}

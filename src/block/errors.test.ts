import { AssertionError } from "node:assert";
import assert from "node:assert/strict";
import { test } from "node:test";
import { BlockError, toBlockError } from "./errors.js";

test("toBlockError keeps BlockErrors, names system errors, makes the rest EIO, and rethrows assertions", () => {
  const own = new BlockError("ENOSPC", "full");
  assert.equal(toBlockError(own, "x"), own);
  assert.equal(toBlockError(Object.assign(new Error("quota"), { code: "EDQUOT" }), "write").errno, "EDQUOT");
  assert.equal(toBlockError(new TypeError("oops"), "read").errno, "EIO");
  const broken = new AssertionError({ message: "chunk stored twice" });
  assert.throws(
    () => toBlockError(broken, "copy-before-write"),
    (error: unknown) => error === broken,
  );
});

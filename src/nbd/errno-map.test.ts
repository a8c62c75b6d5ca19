import { AssertionError } from "node:assert";
import assert from "node:assert/strict";
import { test } from "node:test";
import { BlockError, errnoNames } from "../block/errors.js";
import { errnoOfThrown, nbdErrorOfErrno } from "./errno-map.js";
import { NBD_CMD_FLAG_DF, NBD_CMD_FLAG_FAST_ZERO, NBD_CMD_FLAG_FUA } from "./nbd-protocol.js";

test("nbdErrorOfErrno maps namesakes and groups, and everything else to EINVAL", () => {
  const expected: Record<string, number> = {
    EPERM: 1,
    EROFS: 1,
    EIO: 5,
    ENOMEM: 12,
    ENOSPC: 28,
    EFBIG: 28,
    EDQUOT: 28,
    ESHUTDOWN: 108,
  };
  for (const errno of errnoNames) {
    assert.equal(nbdErrorOfErrno(errno, NBD_CMD_FLAG_FUA), expected[errno] ?? 22, errno);
  }
});

test("ENOTSUP is NBD_ENOTSUP only for FAST_ZERO; EOVERFLOW is NBD_EOVERFLOW only for DF", () => {
  assert.equal(nbdErrorOfErrno("ENOTSUP", 0), 22);
  assert.equal(nbdErrorOfErrno("ENOTSUP", NBD_CMD_FLAG_DF), 22);
  assert.equal(nbdErrorOfErrno("ENOTSUP", NBD_CMD_FLAG_FAST_ZERO), 95);
  assert.equal(nbdErrorOfErrno("EOVERFLOW", 0), 22);
  assert.equal(nbdErrorOfErrno("EOVERFLOW", NBD_CMD_FLAG_FAST_ZERO), 22);
  assert.equal(nbdErrorOfErrno("EOVERFLOW", NBD_CMD_FLAG_DF), 75);
});

test("errnoOfThrown keeps a BlockError's errno, names broken invariants, and calls anything else a bug", () => {
  assert.deepEqual(errnoOfThrown(new BlockError("ENOSPC", "full")), { errno: "ENOSPC", kind: "block-error" });
  assert.deepEqual(errnoOfThrown(new AssertionError({ message: "broken" })), {
    errno: "EIO",
    kind: "broken-invariant",
  });
  assert.deepEqual(errnoOfThrown(new TypeError("x")), { errno: "EIO", kind: "bug" });
  assert.deepEqual(errnoOfThrown(Object.assign(new Error("fs"), { code: "ENOSPC" })), {
    errno: "EIO",
    kind: "bug",
  });
  assert.deepEqual(errnoOfThrown("string"), { errno: "EIO", kind: "bug" });
  assert.deepEqual(errnoOfThrown(undefined), { errno: "EIO", kind: "bug" });
});

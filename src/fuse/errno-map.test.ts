import { AssertionError } from "node:assert";
import assert from "node:assert/strict";
import { constants } from "node:os";
import { test } from "node:test";
import { BlockError } from "../block/errors.js";
import { FUSE_ERROR_NOT_IMPLEMENTED, fuseErrorOf } from "./errno-map.js";

test("BlockErrors become negative Linux errnos", () => {
  assert.equal(fuseErrorOf(new BlockError("EIO", "x")), -constants.errno.EIO);
  assert.equal(fuseErrorOf(new BlockError("ENOSPC", "x")), -constants.errno.ENOSPC);
  assert.equal(fuseErrorOf(new BlockError("EPERM", "x")), -constants.errno.EPERM);
  assert.equal(fuseErrorOf(new BlockError("ENOTSUP", "x")), -constants.errno.EOPNOTSUPP);
});

test("a device's ENOSYS is an I/O error, never 'opcode not implemented'", () => {
  assert.equal(fuseErrorOf(new BlockError("ENOSYS", "x")), -constants.errno.EIO);
  assert.equal(FUSE_ERROR_NOT_IMPLEMENTED, -constants.errno.ENOSYS);
});

test("system errors keep their code, unknown errors are EIO, assertions are rethrown", () => {
  assert.equal(fuseErrorOf(Object.assign(new Error("full"), { code: "EDQUOT" })), -constants.errno.EDQUOT);
  assert.equal(fuseErrorOf(new Error("what")), -constants.errno.EIO);
  assert.equal(fuseErrorOf("a string"), -constants.errno.EIO);
  assert.throws(() => fuseErrorOf(new AssertionError({ message: "broken" })), AssertionError);
});

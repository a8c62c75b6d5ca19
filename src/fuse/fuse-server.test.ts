import assert from "node:assert/strict";
import { test } from "node:test";
import { BlockError } from "../block/errors.js";
import { StaticExportSource } from "../block/export-source.js";
import { FuseServer } from "./fuse-server.js";

test("FuseServer.mount refuses to run without root with a clear EPERM", async (t) => {
  t.mock.method(process as { getuid: () => number }, "getuid", () => 1000);
  await assert.rejects(
    FuseServer.mount(new StaticExportSource(), { mountDir: "/nonexistent/blocksnap-mnt" }),
    (error: unknown) => error instanceof BlockError && error.errno === "EPERM" && /root/.test(error.message),
  );
});

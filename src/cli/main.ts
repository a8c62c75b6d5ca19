#!/usr/bin/env node
/** Entry point of the `blocksnap` command (package.json "bin"). See program.ts. */
import { runCli } from "./program.js";

await runCli(process.argv);

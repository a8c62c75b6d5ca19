/**
 * `blocksnap completion bash|zsh` prints the shell shim of completion.ts, calling this installation's node
 * and CLI script; `blocksnap __complete INDEX WORDS…` (not a listed command) answers it, one candidate per
 * line.
 */
import { fileURLToPath } from "node:url";
import { Argument, type Command } from "commander";
import { bashScript, completionCandidates, daemonLookup, zshScript } from "./completion.js";

export function addCompletionCommands(program: Command): void {
  program
    .command("completion")
    .description("print the shell completion script for bash or zsh")
    .addArgument(new Argument("<shell>", "bash or zsh").choices(["bash", "zsh"]))
    .addHelpText(
      "after",
      "\nExamples:\n  $ source <(blocksnap completion bash)       # in ~/.bashrc\n  $ blocksnap completion zsh > ~/.zfunc/_blocksnap   # a directory in $fpath\n",
    )
    .action((shell: string) => {
      const cliPath = fileURLToPath(new URL("./main.js", import.meta.url));
      const invocation = `${shellQuote(process.execPath)} ${shellQuote(cliPath)}`;
      process.stdout.write(shell === "zsh" ? zshScript(invocation) : bashScript(invocation));
    });
}

/**
 * `blocksnap __complete INDEX WORDS…`, answered before commander parses anything: the words are the
 * shell's line, options and all, not arguments of this command.
 */
export async function answerCompletion(program: Command, args: readonly string[]): Promise<void> {
  const [index, ...words] = args;
  const wordIndex = Number(index);
  if (!Number.isSafeInteger(wordIndex) || wordIndex < 1 || wordIndex > words.length) return;
  const candidates = await completionCandidates(program, words, wordIndex, daemonLookup(words));
  if (candidates.length > 0) process.stdout.write(`${candidates.join("\n")}\n`);
}

function shellQuote(word: string): string {
  return /^[A-Za-z0-9_@%+=:,./-]+$/.test(word) ? word : `'${word.replace(/'/g, "'\\''")}'`;
}

/**
 * Shell completion for bash and zsh, driven by the program itself: the shell script (`blocksnap
 * completion bash|zsh`) is a thin shim that calls the hidden `blocksnap __complete INDEX WORDS…`, which
 * walks the commander tree here — so new commands and options complete without touching the scripts.
 * Device names and snapshot ids come from the running daemon (found with the --socket / --state-dir of
 * the line being completed, like any command); a daemon that does not answer within lookupTimeoutMs
 * completes nothing rather than hanging the shell. An option that takes a path asks the shell for
 * file-name completion (the `__files__` answer).
 */
import type { Command, Option } from "commander";
import type { DeviceListView, SnapshotListView } from "../daemon/api-types.js";
import { resolveControlSocket } from "./command-context.js";
import { ControlClient } from "./control-client.js";

const lookupTimeoutMs = 1_000;
export const filesAnswer = "__files__";

/** Options whose value is a path: the shell completes file names. */
const pathOptions = new Set([
  "--backend",
  "--storage",
  "--out",
  "--socket",
  "--state-dir",
  "--dir",
  "--install",
  "--access",
  "--tls-cert",
  "--tls-key",
  "--tls-ca",
  "--tls-psk",
  "--config",
]);

export interface NameLookup {
  devices(): Promise<string[]>;
  snapshots(): Promise<string[]>;
}

/** Candidates for words[index] of a command line that starts with the program name (words[0]). */
export async function completionCandidates(
  program: Command,
  words: readonly string[],
  index: number,
  lookup: NameLookup,
): Promise<string[]> {
  const current = words[index] ?? "";
  let command = program;
  let positionalCount = 0;
  for (let position = 1; position < index; position++) {
    const word = words[position] ?? "";
    if (word.startsWith("-")) {
      if (findOption(command, word)?.required === true && !word.includes("=")) position++;
      continue;
    }
    const child = visibleCommands(command).find((candidate) => candidate.name() === word);
    if (child !== undefined && positionalCount === 0) {
      command = child;
      continue;
    }
    positionalCount++;
  }
  const previous = words[index - 1] ?? "";
  const pendingOption = index > 1 ? findOption(command, previous) : undefined;
  if (pendingOption?.required) {
    return await optionValues(pendingOption, current, lookup);
  }
  if (current.startsWith("-")) {
    return matching(
      command.options.filter((option) => !option.hidden).map((option) => option.long ?? option.short ?? ""),
      current,
    );
  }
  const children = visibleCommands(command);
  if (children.length > 0 && positionalCount === 0) {
    return matching(
      children.map((child) => child.name()),
      current,
    );
  }
  const argument = command.registeredArguments[positionalCount];
  if (argument === undefined) return [];
  if (argument.name() === "name") return matching(await lookup.devices(), current);
  if (argument.name() === "id") return matching(await lookup.snapshots(), current);
  if (argument.argChoices !== undefined) return matching(argument.argChoices, current);
  return [];
}

async function optionValues(option: Option, current: string, lookup: NameLookup): Promise<string[]> {
  if (option.long === "--device") return matching(await lookup.devices(), current);
  if (option.argChoices !== undefined) return matching(option.argChoices, current);
  if (option.long !== undefined && pathOptions.has(option.long)) return [filesAnswer];
  return [];
}

function findOption(command: Command, word: string): Option | undefined {
  const flag = word.split("=")[0];
  return command.options.find((option) => option.long === flag || option.short === flag);
}

function visibleCommands(command: Command): Command[] {
  return command.commands.filter((child) => (child as unknown as { _hidden?: boolean })._hidden !== true);
}

function matching(candidates: readonly string[], prefix: string): string[] {
  return candidates.filter((candidate) => candidate !== "" && candidate.startsWith(prefix));
}

/** Device names and snapshot ids from the daemon the completed line would talk to. */
export function daemonLookup(words: readonly string[]): NameLookup {
  const optionValue = (flag: string): string | undefined => {
    const index = words.indexOf(flag);
    return index >= 0
      ? words[index + 1]
      : words.find((word) => word.startsWith(`${flag}=`))?.slice(flag.length + 1);
  };
  const client = new ControlClient({
    socketPath: resolveControlSocket({
      socket: optionValue("--socket"),
      stateDir: optionValue("--state-dir"),
    }),
  });
  const bounded = async (fetch: () => Promise<string[]>): Promise<string[]> => {
    let timer: NodeJS.Timeout | undefined;
    const timeout = new Promise<string[]>((resolve) => {
      timer = setTimeout(() => resolve([]), lookupTimeoutMs);
    });
    try {
      return await Promise.race([fetch().catch(() => []), timeout]);
    } finally {
      clearTimeout(timer);
    }
  };
  return {
    devices: () =>
      bounded(async () =>
        (await client.get<DeviceListView>("/v1/devices")).devices.map((device) => device.name),
      ),
    snapshots: () =>
      bounded(async () =>
        (await client.get<SnapshotListView>("/v1/snapshots")).snapshots.map((snapshot) => snapshot.id),
      ),
  };
}

/** The bash shim: COMPREPLY from `__complete`, or file names when it answers __files__. */
export function bashScript(invocation: string): string {
  return `# blocksnap completion for bash: source <(blocksnap completion bash)
_blocksnap() {
  local IFS=$'\\n'
  local candidates
  candidates=($(${invocation} __complete "$COMP_CWORD" "\${COMP_WORDS[@]}" 2>/dev/null))
  if [ "\${candidates[0]}" = "${filesAnswer}" ]; then
    COMPREPLY=($(compgen -f -- "\${COMP_WORDS[COMP_CWORD]}"))
  else
    COMPREPLY=("\${candidates[@]}")
  fi
}
complete -o default -F _blocksnap blocksnap
`;
}

/** The zsh shim (works with compinit; loads with `source <(blocksnap completion zsh)`). */
export function zshScript(invocation: string): string {
  return `#compdef blocksnap
# blocksnap completion for zsh: source <(blocksnap completion zsh) after compinit
_blocksnap() {
  local -a candidates
  candidates=("\${(@f)$(${invocation} __complete $((CURRENT - 1)) "\${words[@]}" 2>/dev/null)}")
  if [[ "\${candidates[1]}" == "${filesAnswer}" ]]; then
    _files
  else
    compadd -- "\${candidates[@]}"
  fi
}
if (( $+functions[compdef] )); then
  compdef _blocksnap blocksnap
fi
`;
}

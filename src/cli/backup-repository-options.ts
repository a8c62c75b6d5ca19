/**
 * The options every `blocksnap backup …` command that names a repository shares (`--repo`, `--key`, the
 * S3 settings) and how they open it. A local path is made absolute (the daemon's working directory is not
 * ours); an s3:// location is passed as given.
 */
import type { Command } from "commander";
import { Repository } from "../backup/repository.js";
import { readKeyFile } from "../backup/repository-key.js";
import { type S3Settings, s3ParallelDefault } from "../backup/s3-store.js";
import { absolutePath, type CommonOptions } from "./command-context.js";
import { countArgument } from "./option-parsers.js";

export interface RepositoryOptions extends CommonOptions {
  readonly repo: string;
  readonly key?: string;
  readonly s3Endpoint?: string;
  readonly s3Region?: string;
  readonly s3Parallel?: number;
}

/** A local repository path made absolute; an s3:// location as given. */
export function repositoryLocation(repo: string): string {
  return repo.startsWith("s3://") ? repo : absolutePath(repo);
}

export function s3Settings(options: RepositoryOptions): S3Settings {
  return {
    ...(options.s3Endpoint === undefined ? {} : { endpoint: options.s3Endpoint }),
    ...(options.s3Region === undefined ? {} : { region: options.s3Region }),
    ...(options.s3Parallel === undefined ? {} : { parallel: options.s3Parallel }),
  };
}

export function storeOf(options: RepositoryOptions) {
  return Repository.storeFor(repositoryLocation(options.repo), s3Settings(options));
}

export async function openRepository(options: RepositoryOptions): Promise<Repository> {
  const key = options.key === undefined ? null : await readKeyFile(options.key);
  return await Repository.open(storeOf(options), { key });
}

export function s3Options(command: Command): Command {
  return command
    .option(
      "--s3-endpoint <url>",
      "S3 endpoint, path-style (default: AWS_ENDPOINT_URL_S3, AWS_ENDPOINT_URL or AWS for the region)",
    )
    .option("--s3-region <region>", "S3 region (default: AWS_REGION, AWS_DEFAULT_REGION or us-east-1)")
    .option(
      "--s3-parallel <n>",
      `S3 requests in flight (default ${s3ParallelDefault})`,
      countArgument("--s3-parallel", 1024),
    );
}

export function repositoryOptions(command: Command): Command {
  return s3Options(
    command
      .requiredOption("--repo <repo>", "the backup repository: a directory or s3://BUCKET/PREFIX")
      .option("--key <file>", "the repository's key file (encrypted repositories)"),
  );
}

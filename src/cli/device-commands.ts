/**
 * `blocksnap device add|remove|list`: origin devices (a file, a block device, or `memory:`), which the
 * daemon tracks, serves and remembers across restarts.
 */
import type { Command } from "commander";
import type { DeviceListView, DeviceView, RemovedView } from "../daemon/api-types.js";
import { absolutePath, addCommonOptions, type CommonOptions, clientAction } from "./command-context.js";
import { sizeArgument } from "./option-parsers.js";
import { formatTable, writeJson, writeLine } from "./output.js";
import { formatSize } from "./units.js";

interface DeviceAddOptions extends CommonOptions {
  readonly backend: string;
  readonly size?: number;
  readonly cbtBlockSize?: number;
}

export function addDeviceCommands(program: Command): void {
  const device = program
    .command("device")
    .description("add, remove and list origin devices")
    .addHelpText(
      "after",
      "\nExamples:\n  $ blocksnap device add disk0 --backend /var/lib/images/disk0.img --size 10G\n  $ blocksnap device list\n",
    );

  addCommonOptions(
    device
      .command("add")
      .description("attach a device: a regular file, a block device, or memory: (RAM)")
      .argument("<name>", "device name, [A-Za-z0-9._-]{1,64}; also its NBD export name")
      .requiredOption("--backend <path>", "the backing file or block device, or memory:")
      .option("--size <size>", "create (or extend) the file to SIZE; required for memory:", sizeArgument)
      .option(
        "--cbt-block-size <size>",
        "CBT block size (power of two, 4K..64M; default from the size)",
        sizeArgument,
      ),
  )
    .addHelpText(
      "after",
      "\nExample:\n  $ blocksnap device add disk0 --backend /var/lib/images/disk0.img --size 10G\n",
    )
    .action(
      clientAction<DeviceAddOptions>(async ({ client, json }, [name], options) => {
        const body: Record<string, unknown> = { name, backendPath: absolutePath(options.backend) };
        if (options.size !== undefined) body.sizeBytes = options.size;
        if (options.cbtBlockSize !== undefined) body.cbtBlockSizeBytes = options.cbtBlockSize;
        const view = await client.post<DeviceView>("/v1/devices", body);
        if (json) return writeJson(view);
        writeLine(`added ${view.name} (${formatSize(view.sizeBytes)})`);
        for (const uri of view.nbdUris) writeLine(`  nbd:   ${uri}`);
        if (view.fusePath !== null) writeLine(`  fuse:  ${view.fusePath}`);
      }),
    );

  addCommonOptions(
    device
      .command("remove")
      .description("detach a device (refused while it is in a snapshot, or in use unless --force)")
      .argument("<name>", "device name")
      .option("--force", "remove even while a file system is mounted on a loop device over its FUSE file"),
  )
    .addHelpText("after", "\nExample:\n  $ blocksnap device remove disk0\n")
    .action(
      clientAction<CommonOptions & { force?: boolean }>(async ({ client, json }, [name], options) => {
        const query = options.force ? "?force=true" : "";
        const view = await client.delete<RemovedView>(`/v1/devices/${encodeURIComponent(name!)}${query}`);
        if (json) return writeJson(view);
        writeLine(`removed ${view.removed}`);
      }),
    );

  addCommonOptions(device.command("list").description("list devices"))
    .addHelpText("after", "\nExample:\n  $ blocksnap device list --json\n")
    .action(
      clientAction<CommonOptions>(async ({ client, json }) => {
        const view = await client.get<DeviceListView>("/v1/devices");
        if (json) return writeJson(view);
        for (const line of deviceTable(view)) writeLine(line);
      }),
    );
}

export function deviceTable(view: DeviceListView): string[] {
  const rows = view.devices.map((device) => [
    device.name,
    formatSize(device.sizeBytes),
    formatSize(device.cbt.blockSizeBytes),
    device.snapshotId ?? "-",
    device.backendPath,
  ]);
  for (const device of view.devicesUnavailable) {
    rows.push([device.name, "?", "?", "-", `${device.backendPath} (unavailable: ${device.error.message})`]);
  }
  if (rows.length === 0) return ["no devices"];
  return formatTable(["NAME", "SIZE", "CBT BLOCK", "SNAPSHOT", "BACKEND"], rows);
}

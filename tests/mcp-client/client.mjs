// An MCP client that is not the Python SDK's: the official TypeScript SDK's, driving the
// mesh bridge for tests/integration/test_mcp_ts_client.py.
//
//   node client.mjs stdio COMMAND ARG...   the bridge as a child process, over stdio
//   node client.mjs http URL [TOKEN]       the bridge over streamable HTTP
//
// It prints one JSON object per line: the tools it lists, the results of calling echo and
// kv.get, then {"event": "waiting"}; it then waits (30 s at most) for
// notifications/tools/list_changed, lists the tools again and prints them.
import { Client } from "@modelcontextprotocol/sdk/client/index.js";
import { StdioClientTransport } from "@modelcontextprotocol/sdk/client/stdio.js";
import { StreamableHTTPClientTransport } from "@modelcontextprotocol/sdk/client/streamableHttp.js";
import { ToolListChangedNotificationSchema } from "@modelcontextprotocol/sdk/types.js";

const emit = (o) => process.stdout.write(JSON.stringify(o) + "\n");
const [mode, target, ...rest] = process.argv.slice(2);
const transport =
  mode === "stdio"
    ? new StdioClientTransport({ command: target, args: rest, env: process.env, stderr: "inherit" })
    : new StreamableHTTPClientTransport(new URL(target), {
        requestInit: rest[0] ? { headers: { Authorization: `Bearer ${rest[0]}` } } : {},
      });

const client = new Client({ name: "mesh-ts-test", version: "1.0.0" });
let changed;
const listChanged = new Promise((resolve) => (changed = resolve));
client.setNotificationHandler(ToolListChangedNotificationSchema, () => changed());

// A mesh action's tool, whether the bridge names it `service.action` or by a portable name
// whose title is the mesh name.
const find = (tools, mesh) =>
  tools.find((t) => t.name === mesh || t.title === mesh || t.name === mesh.replace(".", "_"));

const text = (result) => result.content.filter((c) => c.type === "text").map((c) => c.text).join("");

try {
  await client.connect(transport);
  emit({ event: "initialized", server: client.getServerVersion()?.name ?? null,
         capabilities: client.getServerCapabilities() });
  const tools = (await client.listTools()).tools;
  emit({ event: "tools", names: tools.map((t) => t.name) });
  const echo = await client.callTool({ name: find(tools, "echo.echo").name, arguments: { text: "from node" } });
  emit({ event: "echo", isError: echo.isError ?? false, text: text(echo), structured: echo.structuredContent ?? null });
  const got = await client.callTool({ name: find(tools, "kv.get").name, arguments: { key: "never-set" } });
  emit({ event: "kv.get", isError: got.isError ?? false, text: text(got), structured: got.structuredContent ?? null });
  emit({ event: "waiting" });
  await Promise.race([listChanged, new Promise((_, no) => setTimeout(() => no(new Error("no list_changed in 30 s")), 30000))]);
  const after = (await client.listTools()).tools;
  emit({ event: "changed", names: after.map((t) => t.name), titles: after.map((t) => t.title ?? null) });
  await client.close();
  process.exit(0);
} catch (err) {
  emit({ event: "error", message: String(err?.stack ?? err) });
  process.exit(1);
}

"""An agent using the official MCP Python SDK (`mcp` on PyPI), unchanged, against the gateway.

    python agent_client.py URL KEY MODE SCENARIO

MODE is the SDK's: "legacy" (the initialize handshake, 2025-11-25) or "auto" (server/discover,
2026-07-28). Prints one line per observation for the Rust test to check, then "ALL OK".
"""

import asyncio
import sys

from mcp import Client
from mcp.client.streamable_http import streamable_http_client
from mcp.shared._httpx_utils import create_mcp_http_client
from mcp.shared.exceptions import MCPError

url, key, mode, scenario = sys.argv[1:5]


def text(result) -> str:
    return " ".join(c.text for c in result.content if getattr(c, "type", "") == "text")


async def main() -> None:
    http = create_mcp_http_client(headers={"Authorization": f"Bearer {key}"})
    async with Client(streamable_http_client(url, http_client=http), mode=mode) as client:
        print("VERSION", client._session.protocol_version)
        if scenario == "no-tools":
            try:
                await client.list_tools()
                print("NOTOOLS none")
            except MCPError as e:
                print("NOTOOLS", e.error.message)
            print("ALL OK")
            return
        tools = await client.list_tools()
        print("TOOLS", ",".join(sorted(t.name for t in tools.tools)))
        r = await client.call_tool("lookup_account", {"handle": "@alice"})
        print("LOOKUP", r.is_error, text(r))
        r = await client.call_tool("support__lookup_account", {"handle": "@bob"})
        print("PREFIXED", r.is_error, text(r))
        for name in ["reset_password", "no_such_tool"]:
            try:
                r = await client.call_tool(name, {"handle": "@alice"})
                print("DENIED", name, "no", r.is_error, text(r))
            except MCPError as e:
                print("DENIED", name, e.error.message)
        for server in ["support", "billing"]:
            r = await client.call_tool(f"{server}__echo", {"text": "hi"})
            print("ECHO", server, r.is_error, text(r))
        for i in range(6):
            r = await client.call_tool("lookup_account", {"handle": "@loop"})
            print("REPEAT", i + 1, r.is_error, text(r))
    print("ALL OK")


asyncio.run(main())

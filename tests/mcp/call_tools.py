"""Makes tool calls through the gateway with the official MCP Python SDK and prints each
outcome as one JSON line: {"tool", "is_error", "text", "meta"} or {"tool", "error"}.

    python call_tools.py URL KEY MODE '[["tool", {"arg": 1}], ...]'
"""

import asyncio
import json
import sys

from mcp import Client
from mcp.client.streamable_http import streamable_http_client
from mcp.shared._httpx_utils import create_mcp_http_client
from mcp.shared.exceptions import MCPError

url, key, mode, calls = sys.argv[1], sys.argv[2], sys.argv[3], json.loads(sys.argv[4])


async def main() -> None:
    http = create_mcp_http_client(headers={"Authorization": f"Bearer {key}"})
    async with Client(streamable_http_client(url, http_client=http), mode=mode) as client:
        for name, args in calls:
            try:
                r = await client.call_tool(name, args)
                text = " ".join(c.text for c in r.content if getattr(c, "type", "") == "text")
                meta = r.meta
                if meta is not None and not isinstance(meta, dict):
                    meta = meta.model_dump(by_alias=True, exclude_none=True)
                print(json.dumps({"tool": name, "is_error": r.is_error, "text": text, "meta": meta}), flush=True)
            except MCPError as e:
                print(json.dumps({"tool": name, "error": e.error.message}), flush=True)


asyncio.run(main())

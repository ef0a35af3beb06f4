"""Lists and reads resources and prompts through the gateway with the official MCP SDK, and
prints one JSON object: {"resources", "read", "prompts", "prompt", "unknown"}.

    python resources.py URL KEY MODE
"""

import asyncio
import json
import sys

from mcp import Client
from mcp.client.streamable_http import streamable_http_client
from mcp.shared._httpx_utils import create_mcp_http_client
from mcp.shared.exceptions import MCPError

url, key, mode = sys.argv[1], sys.argv[2], sys.argv[3]


async def main() -> None:
    http = create_mcp_http_client(headers={"Authorization": f"Bearer {key}"})
    async with Client(streamable_http_client(url, http_client=http), mode=mode) as client:
        resources = (await client.list_resources()).resources
        read = await client.read_resource(str(resources[0].uri))
        prompts = (await client.list_prompts()).prompts
        got = await client.get_prompt(prompts[0].name, {"customer": "Ann"})
        try:
            await client.read_resource("policy://nope")
            unknown = None
        except MCPError as e:
            unknown = e.error.message
        print(json.dumps({
            "resources": [str(r.uri) for r in resources],
            "read": read.contents[0].text,
            "prompts": [p.name for p in prompts],
            "prompt": got.messages[0].content.text,
            "unknown": unknown,
        }))


asyncio.run(main())

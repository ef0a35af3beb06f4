"""A real MCP server (the official SDK's MCPServer over Streamable HTTP) for the gateway's
tests: a support desk with tools that read, and tools that change, an account.

    python support_server.py PORT [NAME]

Prints "ready" once listening. Every tool call is appended to calls.log next to nothing but
stderr: the test reads stderr lines "CALL <tool> <json args>" to see what reached the server.
"""

import json
import sys

import anyio
import uvicorn
from mcp.server.mcpserver import MCPServer

port = int(sys.argv[1])
name = sys.argv[2] if len(sys.argv) > 2 else "support"
server = MCPServer(name)


def seen(tool: str, args: dict) -> None:
    print(f"CALL {tool} {json.dumps(args, sort_keys=True)}", file=sys.stderr, flush=True)


@server.tool()
def lookup_account(handle: str) -> str:
    """Looks up an account by its handle."""
    seen("lookup_account", {"handle": handle})
    return f"account {handle}: email {handle.strip('@')}@example.org, plan pro"


@server.tool()
def change_account_email(handle: str, email: str) -> str:
    """Changes the email address of an account."""
    seen("change_account_email", {"handle": handle, "email": email})
    return f"email of {handle} is now {email}"


@server.tool()
def reset_password(handle: str) -> str:
    """Sends a password reset link."""
    seen("reset_password", {"handle": handle})
    return f"reset link sent to {handle}"


@server.tool()
def echo(text: str) -> str:
    """Echoes its input (the same name on every server, to test collisions)."""
    seen("echo", {"text": text})
    return f"{name}: {text}"


@server.resource("policy://refunds", name="refund_policy")
def refund_policy() -> str:
    """The support desk's refund policy."""
    return f"{name}: refunds within 30 days"


@server.prompt()
def apologize(customer: str) -> str:
    """An apology to a customer."""
    return f"Write an apology to {customer} from the {name} desk."


async def main() -> None:
    app = server.streamable_http_app()
    config = uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning")
    s = uvicorn.Server(config)
    async with anyio.create_task_group() as tg:
        tg.start_soon(s.serve)
        while not s.started:
            await anyio.sleep(0.05)
        print("ready", flush=True)


anyio.run(main)

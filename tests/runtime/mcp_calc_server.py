"""A tiny stdio MCP server for the runtime tests: ``calc`` with one tool, ``add``."""

from mcp.server.mcpserver import MCPServer

server = MCPServer("calc")


@server.tool()
def add(a: int, b: int) -> str:
    """Add two integers."""
    return f"sum={a + b}"


if __name__ == "__main__":
    server.run("stdio")

"""The proxy service: the public HTTPS front (web API now, MCP routes next)."""

"""The app service: serves registered MCP apps — registry, sessions, upstream bridges."""

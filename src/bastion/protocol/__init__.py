"""The wire formats the gateway speaks: JSON-RPC 2.0 messages and their framings.

* :mod:`bastion.protocol.jsonrpc`: parse one JSON-RPC message once (with the
  sanitisation that makes "the bytes we authorise are the bytes the upstream
  reads" true), error codes, and encoders for the messages the gateway makes.
* :mod:`bastion.protocol.sse`: an incremental Server-Sent Events parser and encoder.
* :mod:`bastion.protocol.ndjson`: newline-delimited framing (stdio upstreams).

Everything here is pure: bytes in, values out.  Nothing in this package may do
I/O, await, read a clock, or import anything above ``bastion.errors``.
"""

"""The reverse tunnel between an app service and the proxy.

``mux`` multiplexes many logical streams over the one TLS connection an app service keeps
to the proxy.
"""

from __future__ import annotations

from bastion.tunnel.mux import Mux, Stream, StreamReset, TunnelClosed

__all__ = ["Mux", "Stream", "StreamReset", "TunnelClosed"]

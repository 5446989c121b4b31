"""The web UI the proxy serves under ``/web`` (decisions 0041 and 0042)."""

from bastion.webui.app import build_webui

__all__ = ["build_webui"]

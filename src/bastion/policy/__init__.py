"""Access policy: roles, matchers and the decisions made on every MCP message.

``bastion.policy`` answers "may this identity reach this app / call this tool /
do this verb on this resource kind?" from resource models alone.  It is pure:
it must never do I/O, await, read the clock or touch a backend.  Callers load
the user's roles and traits, build an :class:`AccessChecker` once, and ask it.

* :mod:`bastion.policy.matchers`: literal / ``*`` glob / ``^regex$`` patterns,
  trait templates (``{{internal.X}}``, ``{{external.X}}``), label selectors.
* :mod:`bastion.policy.rbac`: :class:`AccessChecker` (deny wins, greedy deny
  for tools, nothing listed = nothing allowed; resources and prompts, where a
  role that says nothing allows all) and the preset roles.
* :mod:`bastion.policy.uris`: resource patterns (URI templates too) and the
  canonical form a judged URI must have (decision 0043).
* :mod:`bastion.policy.arguments`: argument rules, CEL per call (decision 0044).
* :mod:`bastion.policy.pins`: pinned tool definitions, the pure core (decision 0045).
"""

from __future__ import annotations

from bastion.policy.matchers import (
    LabelSelector,
    Matcher,
    MatchKind,
    compile_pattern,
    compile_patterns,
    interpolate,
)
from bastion.policy.rbac import (
    ACCESS_ROLE,
    DEFAULT_MAX_SESSION_TTL,
    EDITOR_ROLE,
    MCP_USER_ROLE,
    AccessChecker,
    Decision,
    ToolPermissions,
    app_labels,
    preset_roles,
)

__all__ = [
    "ACCESS_ROLE",
    "DEFAULT_MAX_SESSION_TTL",
    "EDITOR_ROLE",
    "MCP_USER_ROLE",
    "AccessChecker",
    "Decision",
    "LabelSelector",
    "MatchKind",
    "Matcher",
    "ToolPermissions",
    "app_labels",
    "compile_pattern",
    "compile_patterns",
    "interpolate",
    "preset_roles",
]

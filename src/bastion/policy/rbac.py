"""Role-based access decisions: which apps, which MCP tools, which resource verbs.

An :class:`AccessChecker` is built once per identity (its roles and traits)
and then asked, on every MCP message, whether a tool may be called.  The rules
(Teleport's, see ``teleport-mcp-access.md`` section 2):

* **Apps.** An app is accessible iff some role's ``allow.app_labels`` match its
  labels and no role's ``deny.app_labels`` do.
* **Tools.** A tool is allowed iff the app is accessible, some role whose
  ``allow.app_labels`` match the app lists the tool in ``allow.mcp.tools``, and
  no role at all lists it in ``deny.mcp.tools``.  Deny is *greedy*: a deny
  tool pattern applies whatever that role's labels say.  Nothing listed means
  nothing allowed.
* **Rules.** ``rules`` grant verbs on resource kinds; deny rules win; no rule
  means denied.

Deny wins everywhere.  Nothing in this module does I/O or awaits.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any

from bastion.policy.matchers import LabelSelector, Matcher, compile_patterns
from bastion.resources import (
    RESOURCE_TYPE_LABEL,
    SUB_KIND_LABEL,
    App,
    Metadata,
    Role,
    RoleConditions,
    RoleSpec,
    Rule,
)

__all__ = [
    "ACCESS_ROLE",
    "DEFAULT_MAX_SESSION_TTL",
    "EDITOR_ROLE",
    "MCP_USER_ROLE",
    "AccessChecker",
    "Decision",
    "ToolPermissions",
    "app_labels",
    "preset_roles",
]

#: Session lifetime when no role limits it (also the role default).
DEFAULT_MAX_SESSION_TTL = timedelta(hours=12)

# Cache bounds.  A client chooses tool names, so the per-app decision cache
# must not grow with them; names longer than _MAX_CACHED_TOOL_NAME are decided
# every time rather than stored.
_MAX_APPS = 1024
_MAX_TOOLS_PER_APP = 4096
_MAX_CACHED_TOOL_NAME = 256


@dataclass(frozen=True, slots=True)
class Decision:
    """The outcome of a check, with a reason for humans (audit, logs, errors)."""

    allowed: bool
    reason: str


@dataclass(frozen=True, slots=True)
class ToolPermissions:
    """The tool patterns that apply to one app, after trait interpolation.

    For display (``bastion mcp ls``): ``allowed`` comes from the roles that
    grant the app, ``denied`` from every role.  Deny wins over allow.
    """

    allowed: tuple[str, ...]
    denied: tuple[str, ...]


def app_labels(app: App) -> dict[str, str]:
    """The labels roles are matched against: the app's labels plus ``SUB_KIND_LABEL: mcp``.

    Every app served here is an MCP server, so the internal sub-kind label is
    added when missing (an existing value is kept).
    """
    labels = dict(app.metadata.labels)
    labels.setdefault(SUB_KIND_LABEL, "mcp")
    return labels


@dataclass(frozen=True, slots=True)
class _CompiledRole:
    name: str
    allow_labels: LabelSelector
    deny_labels: LabelSelector
    allow_tools: tuple[Matcher, ...]
    deny_tools: tuple[Matcher, ...]
    allow_rules: tuple[Rule, ...]
    deny_rules: tuple[Rule, ...]

    @classmethod
    def compile(cls, role: Role, traits: Mapping[str, Sequence[str]]) -> _CompiledRole:
        allow, deny = role.spec.allow, role.spec.deny
        return cls(
            name=role.metadata.name,
            allow_labels=LabelSelector.compile(allow.app_labels, traits),
            # fail_closed: a deny pattern that cannot be compiled matches everything.
            deny_labels=LabelSelector.compile(deny.app_labels, traits, fail_closed=True),
            allow_tools=compile_patterns(allow.mcp.tools, traits),
            deny_tools=compile_patterns(deny.mcp.tools, traits, fail_closed=True),
            allow_rules=tuple(allow.rules),
            deny_rules=tuple(deny.rules),
        )


@dataclass(slots=True)
class _AppView:
    """What the checker knows about one app; valid while the app's labels are unchanged."""

    raw_labels: dict[str, str]
    #: Roles whose allow selector matches the app (empty when the app is denied).
    granting: tuple[_CompiledRole, ...]
    #: None if the app is accessible, else the reason it is not.
    denial: Decision | None
    decisions: dict[str, Decision] = field(default_factory=dict)


def _rule_matches(rule: Rule, resource: str, verb: str) -> bool:
    return ("*" in rule.resources or resource in rule.resources) and ("*" in rule.verbs or verb in rule.verbs)


class AccessChecker:
    """Decides what one identity (its roles and traits) may do.

    Patterns are interpolated and compiled once, here.  Per-app results and
    per-(app, tool) decisions are cached in bounded dicts; an app's cache entry
    is dropped when its labels change, so a checker may outlive app updates.
    Roles and traits are fixed: build a new checker when they change.
    """

    __slots__ = ("_apps", "_deny_tools", "_role_names", "_roles", "_ttl")

    def __init__(self, roles: Sequence[Role], traits: Mapping[str, Sequence[str]]) -> None:
        # Copy the traits: the caller's mapping may change after we compiled.
        frozen = {k: (v,) if isinstance(v, str) else tuple(v) for k, v in traits.items()}
        self._roles = tuple(_CompiledRole.compile(r, frozen) for r in roles)
        self._role_names = tuple(r.name for r in self._roles)
        self._deny_tools = tuple(r for r in self._roles if r.deny_tools)
        self._ttl = min((r.spec.options.max_session_ttl for r in roles), default=DEFAULT_MAX_SESSION_TTL)
        self._apps: dict[str, _AppView] = {}

    @property
    def role_names(self) -> tuple[str, ...]:
        """The names of the roles this checker was built from, in order."""
        return self._role_names

    # ------------------------------------------------------------------ apps

    def _view(self, app: App) -> _AppView:
        name = app.metadata.name
        view = self._apps.get(name)
        if view is not None and view.raw_labels == app.metadata.labels:
            return view
        view = self._compute_view(app)
        if name not in self._apps and len(self._apps) >= _MAX_APPS:
            del self._apps[next(iter(self._apps))]  # evict the oldest entry
        self._apps[name] = view
        return view

    def _compute_view(self, app: App) -> _AppView:
        name = app.metadata.name
        labels = app_labels(app)
        raw = dict(app.metadata.labels)
        for role in self._roles:
            if role.deny_labels.matches(labels):
                denial = Decision(False, f'app "{name}" is not accessible (denied by role "{role.name}")')
                return _AppView(raw, (), denial)
        granting = tuple(r for r in self._roles if r.allow_labels.matches(labels))
        if not granting:
            return _AppView(raw, (), Decision(False, f'app "{name}" is not accessible'))
        return _AppView(raw, granting, None)

    def can_access_app(self, app: App) -> bool:
        """True iff some role's ``allow.app_labels`` and no ``deny.app_labels`` match ``app``."""
        return self._view(app).denial is None

    def app_decision(self, app: App) -> Decision:
        """Like :meth:`can_access_app`, with a reason."""
        view = self._view(app)
        if view.denial is not None:
            return view.denial
        return Decision(True, f'app "{app.metadata.name}" is allowed by role "{view.granting[0].name}"')

    # ----------------------------------------------------------------- tools

    def check_tool(self, app: App, tool: str) -> Decision:
        """May ``tool`` be called on ``app``?  Deny wins; nothing listed = denied.

        Cheap on repeat: decisions are cached per (app name, tool).
        """
        view = self._view(app)
        cached = view.decisions.get(tool)
        if cached is not None:
            return cached
        decision = self._decide(view, app.metadata.name, tool)
        if len(tool) <= _MAX_CACHED_TOOL_NAME:
            if len(view.decisions) >= _MAX_TOOLS_PER_APP:
                del view.decisions[next(iter(view.decisions))]
            view.decisions[tool] = decision
        return decision

    def _decide(self, view: _AppView, app_name: str, tool: str) -> Decision:
        if view.denial is not None:
            return view.denial
        # Greedy deny: every role's deny list counts, whatever its labels.
        for role in self._deny_tools:
            for m in role.deny_tools:
                if m.matches(tool):
                    return Decision(False, f'tool "{tool}" is denied by role "{role.name}"')
        for role in view.granting:
            for m in role.allow_tools:
                if m.matches(tool):
                    return Decision(True, f'tool "{tool}" is allowed by role "{role.name}"')
        return Decision(False, f'no role allows tool "{tool}" on app "{app_name}"')

    def tool_permissions(self, app: App) -> ToolPermissions:
        """The interpolated tool patterns that apply to ``app`` (deduplicated, in role order).

        ``allowed`` is empty when the app is not accessible.  A deny pattern
        that could not be compiled is shown as ``*``, which is its effect.
        """
        view = self._view(app)
        allowed = dict.fromkeys(m.pattern for r in view.granting for m in r.allow_tools)
        denied = dict.fromkeys(m.pattern for r in self._deny_tools for m in r.deny_tools)
        return ToolPermissions(tuple(allowed), tuple(denied))

    def filter_tools(self, app: App, tools: Sequence[Mapping[str, Any]]) -> list[Mapping[str, Any]]:
        """The tools (``tools/list`` entries) whose ``name`` is allowed, in order.

        Entries that are not mappings or whose ``name`` is missing or not a
        string are dropped.  Always a list, ``[]`` when nothing is allowed.
        """
        out: list[Mapping[str, Any]] = []
        for tool in tools:
            if not isinstance(tool, Mapping):
                continue
            name = tool.get("name")
            if isinstance(name, str) and self.check_tool(app, name).allowed:
                out.append(tool)
        return out

    # ----------------------------------------------------------------- rules

    def check_rule(self, resource: str, verb: str) -> bool:
        """May ``verb`` be done on resources of kind ``resource``?  Deny rules win; no rule = no."""
        for role in self._roles:
            if any(_rule_matches(rule, resource, verb) for rule in role.deny_rules):
                return False
        return any(_rule_matches(rule, resource, verb) for role in self._roles for rule in role.allow_rules)

    def max_session_ttl(self) -> timedelta:
        """The shortest ``options.max_session_ttl`` of the roles (12h with no roles)."""
        return self._ttl


# ---------------------------------------------------------------- preset roles

MCP_USER_ROLE = "mcp-user"
ACCESS_ROLE = "access"
EDITOR_ROLE = "editor"


def _preset(name: str, description: str, allow: RoleConditions) -> Role:
    return Role(
        metadata=Metadata(name=name, description=description, labels={RESOURCE_TYPE_LABEL: "preset"}),
        spec=RoleSpec(allow=allow),
    )


def preset_roles() -> list[Role]:
    """The roles created at first start: ``mcp-user``, ``access`` and ``editor``.

    * ``mcp-user``: every MCP server (selected by the internal sub-kind label),
      every tool.
    * ``access``: every app, but only the tools in the user's ``mcp_tools``
      trait (none until the trait is set).
    * ``editor``: every verb on every resource kind; no apps, no tools.
    """
    return [
        _preset(
            MCP_USER_ROLE,
            "Access to every MCP server and every tool",
            RoleConditions.model_validate({"app_labels": {SUB_KIND_LABEL: "mcp"}, "mcp": {"tools": ["*"]}}),
        ),
        _preset(
            ACCESS_ROLE,
            "Access to every MCP server, with the tools in the user's mcp_tools trait",
            RoleConditions.model_validate(
                {"app_labels": {"*": "*"}, "mcp": {"tools": ["{{internal.mcp_tools}}"]}}
            ),
        ),
        _preset(
            EDITOR_ROLE,
            "Manage users, roles, tokens and apps",
            RoleConditions(rules=[Rule(resources=["*"], verbs=["*"])]),
        ),
    ]

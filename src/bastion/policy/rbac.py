"""Role-based access decisions: which apps, MCP tools, resources and prompts, which resource verbs.

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
* **Resources and prompts** (decision 0043).  ``mcp.resources`` (URI patterns,
  URI templates too) and ``mcp.prompts`` (names): deny is greedy as for tools;
  among the granting roles, one that does not say allows every one, otherwise
  a pattern must match.  Where anything restricts, a URI not in canonical form
  is refused (:func:`~bastion.policy.uris.uri_problem`).
* **Argument rules** (decision 0044).  An allowed tool's decision carries the
  ``mcp.tool_rules`` that apply to it (:mod:`bastion.policy.arguments`), judged
  per call; ``None`` when none does, so a call without rules costs nothing more.
* **Rules.** ``rules`` grant verbs on resource kinds; deny rules win; no rule
  means denied.

Deny wins everywhere.  Nothing in this module does I/O or awaits.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any

from bastion.policy.arguments import ArgumentRules, CompiledToolRule, compile_tool_rules
from bastion.policy.decision import Decision
from bastion.policy.limits import CompiledRateLimit, RateRule, compile_rate_limits
from bastion.policy.matchers import LabelSelector, Matcher, compile_patterns
from bastion.policy.uris import ResourcePattern, compile_resource_patterns, uri_problem
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
    #: None: the role does not say (every resource / prompt, decision 0043).
    allow_resources: tuple[ResourcePattern, ...] | None
    deny_resources: tuple[ResourcePattern, ...]
    allow_prompts: tuple[Matcher, ...] | None
    deny_prompts: tuple[Matcher, ...]
    allow_tool_rules: tuple[CompiledToolRule, ...]
    deny_tool_rules: tuple[CompiledToolRule, ...]
    rate_limits: tuple[CompiledRateLimit, ...]

    @classmethod
    def compile(cls, role: Role, traits: Mapping[str, Sequence[str]]) -> _CompiledRole:
        allow, deny = role.spec.allow, role.spec.deny
        name = role.metadata.name
        return cls(
            name=name,
            allow_labels=LabelSelector.compile(allow.app_labels, traits),
            # fail_closed: a deny pattern that cannot be compiled matches everything.
            deny_labels=LabelSelector.compile(deny.app_labels, traits, fail_closed=True),
            allow_tools=compile_patterns(allow.mcp.tools, traits),
            deny_tools=compile_patterns(deny.mcp.tools, traits, fail_closed=True),
            allow_rules=tuple(allow.rules),
            deny_rules=tuple(deny.rules),
            allow_resources=(
                None
                if allow.mcp.resources is None
                else compile_resource_patterns(allow.mcp.resources, traits)
            ),
            deny_resources=compile_resource_patterns(deny.mcp.resources or (), traits, fail_closed=True),
            allow_prompts=None if allow.mcp.prompts is None else compile_patterns(allow.mcp.prompts, traits),
            deny_prompts=compile_patterns(deny.mcp.prompts or (), traits, fail_closed=True),
            allow_tool_rules=compile_tool_rules(name, "allow", allow.mcp.tool_rules, traits),
            deny_tool_rules=compile_tool_rules(name, "deny", deny.mcp.tool_rules, traits),
            rate_limits=compile_rate_limits(name, allow.mcp.rate_limits, traits),
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
    #: Per tool: the role rate limits (decision 0051) a call draws from on this app.
    limits: dict[str, tuple[CompiledRateLimit, ...]] = field(default_factory=dict)
    #: Every resource / prompt is allowed (no deny pattern anywhere, and a granting role
    #: allows all of them): lists pass whole and no URI is checked (decision 0043).
    resources_open: bool = True
    prompts_open: bool = True


def _rule_matches(rule: Rule, resource: str, verb: str) -> bool:
    return ("*" in rule.resources or resource in rule.resources) and ("*" in rule.verbs or verb in rule.verbs)


class AccessChecker:
    """Decides what one identity (its roles and traits) may do.

    Patterns are interpolated and compiled once, here.  Per-app results and
    per-(app, tool) decisions are cached in bounded dicts; an app's cache entry
    is dropped when its labels change, so a checker may outlive app updates.
    Roles and traits are fixed: build a new checker when they change.
    """

    __slots__ = (
        "_any_rate_limits",
        "_any_tool_rules",
        "_apps",
        "_deny_prompts",
        "_deny_resources",
        "_deny_tool_rules",
        "_deny_tools",
        "_role_names",
        "_roles",
        "_traits",
        "_ttl",
    )

    def __init__(self, roles: Sequence[Role], traits: Mapping[str, Sequence[str]]) -> None:
        # Copy the traits: the caller's mapping may change after we compiled.
        frozen = {k: (v,) if isinstance(v, str) else tuple(v) for k, v in traits.items()}
        self._traits = frozen
        self._roles = tuple(_CompiledRole.compile(r, frozen) for r in roles)
        self._role_names = tuple(r.name for r in self._roles)
        self._deny_tools = tuple(r for r in self._roles if r.deny_tools)
        self._deny_resources = tuple(r for r in self._roles if r.deny_resources)
        self._deny_prompts = tuple(r for r in self._roles if r.deny_prompts)
        self._deny_tool_rules = tuple(rule for r in self._roles for rule in r.deny_tool_rules)
        self._any_tool_rules = bool(self._deny_tool_rules) or any(r.allow_tool_rules for r in self._roles)
        self._any_rate_limits = any(r.rate_limits for r in self._roles)
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
        return _AppView(
            raw,
            granting,
            None,
            resources_open=not self._deny_resources
            and any(r.allow_resources is None or _opens(r.allow_resources) for r in granting),
            prompts_open=not self._deny_prompts
            and any(r.allow_prompts is None or _opens(r.allow_prompts) for r in granting),
        )

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
        if self._any_tool_rules:
            return self._decide_with_rules(view, app_name, tool)
        for role in view.granting:
            for m in role.allow_tools:
                if m.matches(tool):
                    return Decision(True, f'tool "{tool}" is allowed by role "{role.name}"')
        return Decision(False, f'no role allows tool "{tool}" on app "{app_name}"')

    def _decide_with_rules(self, view: _AppView, app_name: str, tool: str) -> Decision:
        """As :meth:`_decide` when some role has argument rules: an allowed tool's decision
        carries the rules that apply to it (decision 0044), checked per call."""
        first: _CompiledRole | None = None
        unconditional = False
        groups: list[tuple[CompiledToolRule, ...]] = []
        for role in view.granting:
            if not any(m.matches(tool) for m in role.allow_tools):
                continue
            first = first or role
            rules = tuple(r for r in role.allow_tool_rules if r.applies_to(tool))
            if rules:
                groups.append(rules)
            else:
                unconditional = True
        if first is None:
            return Decision(False, f'no role allows tool "{tool}" on app "{app_name}"')
        reason = f'tool "{tool}" is allowed by role "{first.name}"'
        deny = tuple(r for r in self._deny_tool_rules if r.applies_to(tool))
        if unconditional and not deny:
            return Decision(True, reason)
        check = ArgumentRules(tool, deny, None if unconditional else tuple(groups), self._traits)
        return Decision(True, reason, check)

    @property
    def any_rate_limits(self) -> bool:
        """Whether any role has rate limits (else :meth:`rate_limits` is always empty)."""
        return self._any_rate_limits

    def rate_limits(self, app: App, tool: str, user: str) -> tuple[RateRule, ...]:
        """The per-user buckets a call of ``tool`` on ``app`` by ``user`` draws from: every
        matching limit of every role granting the app (the strictest binds; decision 0051)."""
        view = self._view(app)
        found = view.limits.get(tool)
        if found is None:
            found = tuple(lim for r in view.granting for lim in r.rate_limits if lim.applies_to(tool))
            if len(tool) <= _MAX_CACHED_TOOL_NAME:
                if len(view.limits) >= _MAX_TOOLS_PER_APP:
                    del view.limits[next(iter(view.limits))]
                view.limits[tool] = found
        name = app.metadata.name
        return tuple(lim.rule(name, user) for lim in found)

    def tool_permissions(self, app: App) -> ToolPermissions:
        """The interpolated tool patterns that apply to ``app`` (deduplicated, in role order).

        ``allowed`` is empty when the app is not accessible.  A deny pattern
        that could not be compiled is shown as ``*``, which is its effect.
        """
        view = self._view(app)
        allowed = dict.fromkeys(m.pattern for r in view.granting for m in r.allow_tools)
        denied = dict.fromkeys(m.pattern for r in self._deny_tools for m in r.deny_tools)
        return ToolPermissions(tuple(allowed), tuple(denied))

    def content_permissions(self, app: App) -> dict[str, Any]:
        """For display (``bastion mcp ls --format=json``): the resource and prompt patterns and
        the argument rules that apply to ``app``.  A granting role that does not restrict
        resources (prompts) shows as ``*``, which is its effect (decision 0043)."""
        view = self._view(app)
        allow_rules = [rule for role in view.granting for rule in role.allow_tool_rules]
        rules = [
            {
                "role": rule.role,
                "name": rule.label,
                "effect": effect,
                "tools": [m.pattern for m in rule.tools],
                "when": rule.program.source,
            }
            for effect, some in (("allow", allow_rules), ("deny", self._deny_tool_rules))
            for rule in some
        ]
        return {
            "resources": _shown_patterns(
                [r.allow_resources for r in view.granting], [r.deny_resources for r in self._deny_resources]
            ),
            "prompts": _shown_patterns(
                [r.allow_prompts for r in view.granting], [r.deny_prompts for r in self._deny_prompts]
            ),
            "tool_rules": rules,
        }

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

    # ----------------------------------------------- resources and prompts

    def check_resource(self, app: App, uri: str) -> Decision:
        """May the resource at ``uri`` be read (listed, subscribed to)?  Deny wins; a role
        that does not mention resources allows all of them (decision 0043).  Where a rule
        restricts, a URI not in canonical form is refused (:func:`~bastion.policy.uris.uri_problem`)."""
        view = self._view(app)
        if view.denial is not None:
            return view.denial
        if view.resources_open:
            return _OPEN
        problem = uri_problem(uri)
        if problem is not None:
            return Decision(False, f'resource URI "{_shown(uri)}" is refused: {problem}')
        return self._resource(view, app.metadata.name, uri, template=False)

    def check_resource_template(self, app: App, template: str) -> Decision:
        """May the URI template ``template`` be listed or completed?  Its text is matched (and, as
        a ``ref/resource`` may name a URI rather than a template, so is it as a URI)."""
        view = self._view(app)
        if view.denial is not None:
            return view.denial
        if view.resources_open:
            return _OPEN
        return self._resource(view, app.metadata.name, template, template=True)

    def _resource(self, view: _AppView, app_name: str, value: str, *, template: bool) -> Decision:
        what = "resource template" if template else "resource"
        for role in self._deny_resources:
            for p in role.deny_resources:
                if p.matches_uri(value) or (template and p.matches_template(value)):
                    return _denied_by(what, value, role.name, "resources", p.pattern)
        for role in view.granting:
            if role.allow_resources is None:
                return Decision(True, f'role "{role.name}" does not restrict resources')
            for p in role.allow_resources:
                if p.matches_uri(value) or (template and p.matches_template(value)):
                    return Decision(True, f'{what} allowed by role "{role.name}"')
        return Decision(False, f'no role allows {what} "{_shown(value)}" on app "{app_name}" (mcp.resources)')

    def check_prompt(self, app: App, name: str) -> Decision:
        """May the prompt ``name`` be listed, got or completed?  Deny wins; a role that does
        not mention prompts allows all of them (decision 0043)."""
        view = self._view(app)
        if view.denial is not None:
            return view.denial
        if view.prompts_open:
            return _OPEN
        for role in self._deny_prompts:
            for m in role.deny_prompts:
                if m.matches(name):
                    return _denied_by("prompt", name, role.name, "prompts", m.pattern)
        for role in view.granting:
            if role.allow_prompts is None:
                return Decision(True, f'role "{role.name}" does not restrict prompts')
            if any(m.matches(name) for m in role.allow_prompts):
                return Decision(True, f'prompt allowed by role "{role.name}"')
        app_name = app.metadata.name
        return Decision(False, f'no role allows prompt "{_shown(name)}" on app "{app_name}" (mcp.prompts)')

    def filter_listed(self, app: App, method: str, entries: Sequence[Any]) -> list[Any] | None:
        """The entries of a ``resources/list``, ``resources/templates/list`` or ``prompts/list``
        result that the rules allow, in order; ``None`` if every entry is allowed (pass the
        list on as it is).  Entries that are not mappings, or lack a string key, are dropped
        when anything is filtered."""
        view = self._view(app)
        if view.denial is not None:
            return []
        check: Callable[[App, str], Decision]
        if method == "prompts/list":
            if view.prompts_open:
                return None
            key, check = "name", self.check_prompt
        elif method == "resources/list":
            if view.resources_open:
                return None
            key, check = "uri", self.check_resource
        else:
            if view.resources_open:
                return None
            key, check = "uriTemplate", self.check_resource_template
        out: list[Any] = []
        for entry in entries:
            if not isinstance(entry, Mapping):
                continue
            value = entry.get(key)
            if isinstance(value, str) and check(app, value).allowed:
                out.append(entry)
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


_OPEN = Decision(True, "no role restricts it")
_MAX_SHOWN = 200


def _opens(patterns: tuple[Any, ...]) -> bool:
    """True iff ``patterns`` hold ``*`` (which allows everything)."""
    return any(p.pattern == "*" for p in patterns)


def _shown_patterns(
    allow: Sequence[tuple[Any, ...] | None], deny: Sequence[tuple[Any, ...]]
) -> dict[str, list[str]]:
    """Allowed patterns (``*`` for a role that does not say) and denied ones, deduplicated."""
    allowed: dict[str, None] = {}
    for patterns in allow:
        if patterns is None:
            allowed["*"] = None
        else:
            allowed.update(dict.fromkeys(p.pattern for p in patterns))
    denied = dict.fromkeys(p.pattern for patterns in deny for p in patterns)
    return {"allowed": list(allowed), "denied": list(denied)}


def _denied_by(what: str, value: str, role: str, field: str, pattern: str) -> Decision:
    return Decision(
        False, f'{what} "{_shown(value)}" is denied by role "{role}" (deny.mcp.{field} "{_shown(pattern)}")'
    )


def _shown(value: str) -> str:
    """``value`` bounded for a reason text (a URI or name the client chose)."""
    return value if len(value) <= _MAX_SHOWN else value[:_MAX_SHOWN] + "..."


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
      every tool, resource and prompt.
    * ``access``: every app, but only the tools in the user's ``mcp_tools``
      trait (none until the trait is set); every resource and prompt (said
      explicitly: a role that does not mention them allows them too, decision 0043).
    * ``editor``: every verb on every resource kind; no apps, no tools.
    """
    return [
        _preset(
            MCP_USER_ROLE,
            "Access to every MCP server and every tool",
            RoleConditions.model_validate(
                {
                    "app_labels": {SUB_KIND_LABEL: "mcp"},
                    "mcp": {"tools": ["*"], "resources": ["*"], "prompts": ["*"]},
                }
            ),
        ),
        _preset(
            ACCESS_ROLE,
            "Access to every MCP server, with the tools in the user's mcp_tools trait",
            RoleConditions.model_validate(
                {
                    "app_labels": {"*": "*"},
                    "mcp": {"tools": ["{{internal.mcp_tools}}"], "resources": ["*"], "prompts": ["*"]},
                }
            ),
        ),
        _preset(
            EDITOR_ROLE,
            "Manage users, roles, tokens and apps",
            RoleConditions(rules=[Rule(resources=["*"], verbs=["*"])]),
        ),
    ]

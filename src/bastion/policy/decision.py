"""The outcome of a policy check (rbac, arguments)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

__all__ = ["ArgumentsCheck", "Decision"]


@dataclass(frozen=True, slots=True)
class Decision:
    """The outcome of a check, with a reason for humans (audit, logs, errors).

    ``check_arguments`` is set on an allowed tool decision when argument rules
    apply to that tool (decision 0044): the call is allowed only if calling it
    with the call's ``arguments`` and the caller's user name allows it too.
    ``None`` (the common case) means the name alone decides: no per-call work.
    """

    allowed: bool
    reason: str
    check_arguments: ArgumentsCheck | None = field(default=None, compare=False)


#: ``check(arguments, username) -> Decision``.
ArgumentsCheck = Callable[[Any, str], Decision]

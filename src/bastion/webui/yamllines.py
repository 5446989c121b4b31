"""Which line of a YAML text an error is about, to show it next to that line.

``bastion create`` reports problems as ``key.path[0].sub: reason`` (``resources/codec.py``);
the editor puts each next to the line of that key in the text the user typed.  Pure.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import yaml

_PART = re.compile(r'\.?([A-Za-z0-9_\-*]+)|\[(\d+)\]|\["((?:[^"\\]|\\.)*)"\]|\[key\]')
_PROBLEM = re.compile(r"^((?:[A-Za-z0-9_\-*]+|\[\d+\]|\[\"(?:[^\"\\]|\\.)*\"\]|\[key\]|\.)+): (.+)$")


@dataclass(frozen=True)
class Problem:
    line: int  # 1-based; 0 = the document as a whole
    message: str


def path_parts(path: str) -> list[str | int]:
    parts: list[str | int] = []
    for m in _PART.finditer(path):
        if m.group(1) is not None:
            parts.append(m.group(1))
        elif m.group(2) is not None:
            parts.append(int(m.group(2)))
        elif m.group(3) is not None:
            parts.append(m.group(3).replace('\\"', '"').replace("\\\\", "\\"))
    return parts


#: The most problems shown next to their lines; the rest are counted in one line.
MOST = 60


def _compose(text: str) -> yaml.Node | None:
    """The first document's node tree (aliases are shared nodes, never copies), or None."""
    try:
        return yaml.compose(text, Loader=yaml.SafeLoader)
    except (yaml.YAMLError, RecursionError):  # the text was decoded before; only a guard
        return None


def line_of(text: str, path: str) -> int:
    """The 1-based line of ``path`` in the first document of ``text`` (the deepest part found;
    0 when the text does not parse)."""
    return _line_in(_compose(text), path)


def _line_in(node: yaml.Node | None, path: str) -> int:
    if node is None:
        return 0
    line = node.start_mark.line + 1
    for part in path_parts(path):
        if isinstance(node, yaml.MappingNode):
            for key, value in node.value:
                if isinstance(key, yaml.ScalarNode) and key.value == str(part):
                    line, node = key.start_mark.line + 1, value
                    break
            else:
                return line
        elif isinstance(node, yaml.SequenceNode) and isinstance(part, int) and part < len(node.value):
            node = node.value[part]
            line = node.start_mark.line + 1
        else:
            return line
    return line


def problems(text: str, message: str) -> list[Problem]:
    """The lines of a validation ``message``, each placed at its line of ``text``: the first
    ``MOST`` of them, and one line counting the others.  The text is composed once, however
    many problems there are."""
    out: list[Problem] = []
    lines = [raw.strip() for raw in message.splitlines() if raw.strip()]
    root = _compose(text) if any(_PROBLEM.match(raw) for raw in lines[:MOST]) else None
    for raw in lines[:MOST]:
        m = _PROBLEM.match(raw)
        out.append(Problem(_line_in(root, m.group(1)), raw) if m else Problem(0, raw[:500]))
    if len(lines) > MOST:
        out.append(Problem(0, f"... and {len(lines) - MOST} more problems"))
    return out

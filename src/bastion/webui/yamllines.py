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


def line_of(text: str, path: str) -> int:
    """The 1-based line of ``path`` in the first document of ``text`` (the deepest part found;
    0 when the text does not parse)."""
    try:
        node = yaml.compose(text, Loader=yaml.SafeLoader)
    except yaml.YAMLError:
        return 0
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
    """The lines of a validation ``message``, each placed at its line of ``text``."""
    out = []
    for raw in message.splitlines():
        m = _PROBLEM.match(raw.strip())
        if m:
            out.append(Problem(line_of(text, m.group(1)), raw.strip()))
        elif raw.strip():
            out.append(Problem(0, raw.strip()))
    return out

"""No module imports another module's underscore names (decision 0024).

The layer contracts themselves are checked by ``lint-imports`` (``make test``); this is the part
import-linter cannot express.  Private *modules* (``bastion._pg``, ``bastion._time``) are the
project's shared helpers and may be imported; their names without an underscore are their API.
"""

from __future__ import annotations

import ast
from pathlib import Path

import bastion

SRC = Path(bastion.__file__).parent


def test_no_module_imports_another_modules_private_names() -> None:
    found = []
    for path in sorted(SRC.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("bastion"):
                found += [
                    f"{path.relative_to(SRC)}: {node.module}.{a.name}"
                    for a in node.names
                    if a.name.startswith("_") and not a.name.startswith("__")
                ]
    assert found == []

"""Decoding and encoding of YAML/JSON text, shared by config files and resources.

What this module is for:

* ``load_documents`` turns text into a list of mappings.  It is strict on
  purpose: a mapping that repeats a key is an error (PyYAML would silently keep
  the last value), so the bytes an operator reviewed can only mean one thing.
  Errors carry the source name, line and column.  It is bounded: a document
  nested deeper than ``MAX_DEPTH`` or holding more than ``MAX_NODES`` values once
  its aliases are expanded (a "billion laughs") is refused before it is built.
* ``format_pydantic_error`` / ``pydantic_problems`` turn a
  ``pydantic.ValidationError`` into ``key.path[0].sub: reason`` lines, the one
  error format users see for configuration files and resources alike.
* ``located_error`` lets a model-level validator point at a precise key path
  below the model (e.g. ``apps[1].name``) instead of at the model itself.
* ``dump_yaml`` / ``dump_json`` write plain data back out.

What it must not do: know about any particular model or service.  It must not
import anything from ``bastion`` except ``bastion.errors``; it validates
syntax only, never meaning.
"""

from __future__ import annotations

import json
import json.decoder
import json.scanner
from collections.abc import Callable
from typing import Any

import orjson
import pydantic
import yaml
from pydantic_core import PydanticCustomError

from bastion.errors import ValidationError

__all__ = [
    "LOCATED_ERROR_TYPE",
    "DecodeError",
    "dump_json",
    "dump_yaml",
    "format_loc",
    "format_pydantic_error",
    "load_documents",
    "located_error",
    "pydantic_problems",
]

#: ``type`` of the pydantic errors built by ``located_error``.
LOCATED_ERROR_TYPE = "located"

Loc = tuple[str | int, ...]

#: The deepest nesting of one document (resources and configs are a handful of levels deep).
MAX_DEPTH = 64
#: The most values (scalars, lists, mappings) one document holds, each alias counted as the
#: copy it becomes: 9 anchors of 9 aliases each are 9**9 values in 500 bytes of YAML.
MAX_NODES = 100_000


class DecodeError(ValidationError):
    """Text that is not valid YAML/JSON, or not a list of mappings.

    ``line`` and ``column`` are 1-based, or 0 when unknown; ``problem`` is the
    message without the ``<source>: line L, column C:`` prefix.
    """

    def __init__(self, source: str, problem: str, line: int = 0, column: int = 0) -> None:
        where = f"line {line}, column {column}: " if line else ""
        super().__init__(f"{source}: {where}{problem}")
        self.source = source
        self.problem = problem
        self.line = line
        self.column = column

    @property
    def location(self) -> str:
        """``line L, column C: problem`` (or just the problem when no position is known)."""
        if not self.line:
            return self.problem
        return f"line {self.line}, column {self.column}: {self.problem}"


# --------------------------------------------------------------------- decoding


class _StrictLoader(yaml.SafeLoader):
    """``SafeLoader`` that rejects a mapping in which a key appears twice.

    Keys are compared after construction, so ``1`` and ``"1"`` differ while
    ``yes`` and ``true`` (both the boolean true in YAML 1.1) are the same key,
    exactly as they would collide in the resulting ``dict``.  Keys brought in by
    a ``<<`` merge may be overridden (that is what a merge is for); only the
    keys written in the mapping itself must be unique.
    """

    _depth = 0

    def compose_node(self, parent: yaml.Node | None, index: Any) -> yaml.Node | None:
        # PyYAML composes recursively: bounded here, before Python's own limit is reached.
        if self._depth >= MAX_DEPTH:
            mark = self.peek_event().start_mark  # type: ignore[no-untyped-call]
            raise yaml.composer.ComposerError(None, None, f"nested more than {MAX_DEPTH} levels deep", mark)
        self._depth += 1
        try:
            return super().compose_node(parent, index)
        finally:
            self._depth -= 1

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        if isinstance(node, yaml.MappingNode):
            seen: dict[Any, yaml.Mark] = {}
            for key_node, _ in node.value:
                if key_node.tag == "tag:yaml.org,2002:merge":
                    continue
                key = self.construct_object(key_node, deep=True)
                try:
                    first = seen.get(key)
                except TypeError:  # unhashable key: SafeLoader reports it below
                    continue
                if first is not None:
                    raise yaml.constructor.ConstructorError(
                        None,
                        None,
                        f'duplicate key "{key}" (first defined on line {first.line + 1})',
                        key_node.start_mark,
                    )
                seen[key] = key_node.start_mark
        return super().construct_mapping(node, deep=deep)


def _expanded_size(root: yaml.Node) -> int:
    """How many values ``root`` becomes once built, each alias counted as a copy (an alias is
    the same node object as its anchor, so a node's size is computed once: linear time)."""
    sizes: dict[int, int] = {}

    def size(node: yaml.Node) -> int:
        known = sizes.get(id(node))
        if known is not None:
            return known
        total = 1
        if isinstance(node, yaml.SequenceNode):
            total += sum(size(child) for child in node.value)
        elif isinstance(node, yaml.MappingNode):
            total += sum(size(k) + size(v) for k, v in node.value)
        sizes[id(node)] = total = min(total, MAX_NODES + 1)
        return total

    return size(root)  # (recursion bounded by MAX_DEPTH)


def _yaml_error(source: str, text: str, err: yaml.YAMLError) -> DecodeError:
    if isinstance(err, yaml.MarkedYAMLError):
        mark = err.problem_mark or err.context_mark
        problem = err.problem or err.context or "invalid YAML"
        if err.problem and err.context:
            problem = f"{err.problem} ({err.context})"
        if mark is not None:
            return DecodeError(source, problem, mark.line + 1, mark.column + 1)
        return DecodeError(source, problem)
    if isinstance(err, yaml.reader.ReaderError):
        before = text[: err.position]
        line = before.count("\n") + 1
        column = err.position - (before.rfind("\n") + 1) + 1
        char = err.character if isinstance(err.character, str) else chr(err.character)
        return DecodeError(source, f"character {ord(char):#06x} is not allowed", line, column)
    return DecodeError(source, str(err))


def _kind_of(value: Any) -> str:
    """How a YAML reader would name the type of ``value`` (``a list``, ``a string``...)."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, int):
        return "an integer"
    if isinstance(value, float):
        return "a number"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, list | tuple):
        return "a list"
    if isinstance(value, dict):
        return "a mapping"
    return f"a {type(value).__name__}"


class _DuplicateJSONKey(Exception):
    def __init__(self, key: str, line: int) -> None:
        super().__init__(key)
        self.key = key
        self.line = line


class _StrictJSONDecoder(json.JSONDecoder):
    """Stdlib JSON decoder that rejects an object in which a key appears twice.

    It uses the pure-Python scanner so that it learns where each object
    starts and can name that line in the error.
    """

    def __init__(self) -> None:
        super().__init__()
        self.parse_object: Callable[..., Any] = self._parse_object
        # The C scanner ignores ``parse_object``; the pure-Python one honours it.
        make_scanner = getattr(json.scanner, "py_make_scanner")  # noqa: B009 (not in typeshed)
        self.scan_once: Callable[[str, int], tuple[Any, int]] = make_scanner(self)

    @staticmethod
    def _parse_object(
        s_and_end: tuple[str, int],
        strict: bool,
        scan_once: Callable[[str, int], tuple[Any, int]],
        object_hook: Any,
        object_pairs_hook: Any,
        memo: dict[str, str] | None = None,
    ) -> tuple[dict[str, Any], int]:
        text, start = s_and_end

        def unique(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
            out: dict[str, Any] = {}
            for key, value in pairs:
                if key in out:
                    raise _DuplicateJSONKey(key, text.count("\n", 0, start) + 1)
                out[key] = value
            return out

        return json.decoder.JSONObject(  # type: ignore[attr-defined,no-any-return]
            s_and_end, strict, scan_once, object_hook, unique, memo
        )


def _load_json(text: str, *, source: str) -> dict[str, Any] | None:
    """Strict JSON, used only for JSON text that PyYAML cannot read (e.g. tab indents).

    Returns None when the text is not valid JSON either.
    """
    try:
        data = _StrictJSONDecoder().decode(text)
    except _DuplicateJSONKey as e:
        raise DecodeError(
            source, f'duplicate key "{e.key}" (in the object starting on line {e.line})', e.line, 1
        ) from None
    except RecursionError:  # the JSON decoder recurses per level, as PyYAML does
        raise DecodeError(source, "nested too deeply") from None
    except ValueError:
        return None
    if not isinstance(data, dict):
        raise DecodeError(source, f"document 1 is {_kind_of(data)}, expected a mapping", 1, 1)
    return data


def load_documents(text: str, *, source: str) -> list[dict[str, Any]]:
    """Parse YAML (and therefore JSON) text into its non-empty documents.

    Documents are separated by ``---``; empty documents are skipped.  Every
    remaining document must be a mapping.  Raises ``DecodeError`` (a
    ``bastion.errors.ValidationError``) with ``<source>: line L, column C: ...``.

    JSON text that PyYAML rejects (JSON allows tabs where YAML does not) is
    read by a strict JSON decoder instead; if that fails too, the YAML error
    is reported.
    """
    try:
        return _load_yaml(text, source=source)
    except (yaml.scanner.ScannerError, yaml.parser.ParserError, yaml.reader.ReaderError) as e:
        if text.lstrip().startswith("{"):
            data = _load_json(text, source=source)
            if data is not None:
                return [data]
        raise _yaml_error(source, text, e) from None
    except yaml.YAMLError as e:
        raise _yaml_error(source, text, e) from None


def _load_yaml(text: str, *, source: str) -> list[dict[str, Any]]:
    """The non-empty documents of ``text``; PyYAML's own errors propagate."""
    docs: list[dict[str, Any]] = []
    loader = _StrictLoader(text)
    try:
        index = 0
        while loader.check_node():
            node = loader.get_node()
            index += 1
            if node is None:
                continue
            if _expanded_size(node) > MAX_NODES:
                problem = f"document {index} holds more than {MAX_NODES} values once its aliases are expanded"
                raise DecodeError(source, problem, node.start_mark.line + 1, node.start_mark.column + 1)
            data = loader.construct_document(node)
            if data is None:
                continue
            if not isinstance(data, dict):
                problem = f"document {index} is {_kind_of(data)}, expected a mapping"
                raise DecodeError(source, problem, node.start_mark.line + 1, node.start_mark.column + 1)
            docs.append(data)
    finally:
        loader.dispose()
    return docs


# ------------------------------------------------------------- pydantic errors


def located_error(loc: Loc, reason: str) -> PydanticCustomError:
    """An error for a model validator to raise that points ``loc`` below the model.

    ``pydantic_problems`` appends ``loc`` to the error's own location, so a
    check on a list (``duplicate app name``) can name the exact element.
    """
    return PydanticCustomError(LOCATED_ERROR_TYPE, "{reason}", {"reason": reason, "loc": loc})


def _simple_key(key: str) -> bool:
    return bool(key) and all(c.isalnum() or c in "_-*" for c in key)


def format_loc(loc: Loc, prefix: str = "") -> str:
    """``("apps", 0, "uri")`` -> ``apps[0].uri`` (after ``prefix``, if any).

    Keys that are not plain words (label keys with dots or slashes, for
    example) are quoted: ``labels["bastion.internal/x"]``.
    """
    out = prefix
    for item in loc:
        if isinstance(item, int):
            out += f"[{item}]"
        elif item == "[key]":  # pydantic's marker for "the key itself was invalid"
            out += "[key]"
        elif _simple_key(item):
            out += f".{item}" if out else item
        else:
            out += '["' + item.replace("\\", "\\\\").replace('"', '\\"') + '"]'
    return out


_TYPE_ERRORS = {
    "dict_type": "a mapping",
    "model_type": "a mapping",
    "model_attributes_type": "a mapping",
    "list_type": "a list",
    "string_type": "a string",
    "bool_type": "a boolean",
    "int_type": "an integer",
}


def _reason(err: Any) -> str:
    etype = err["type"]
    if etype == "extra_forbidden":
        return "unknown field"
    if etype == "missing":
        return "required field missing"
    if etype in _TYPE_ERRORS:
        return f"expected {_TYPE_ERRORS[etype]}, got {_kind_of(err.get('input'))}"
    msg = str(err["msg"])
    for noise in ("Value error, ", "Assertion failed, "):
        if msg.startswith(noise):
            return msg[len(noise) :]
    return msg


def pydantic_problems(err: pydantic.ValidationError, prefix: str = "") -> list[tuple[str, str]]:
    """``(key path, reason)`` for every error in ``err``, in pydantic's order."""
    problems: list[tuple[str, str]] = []
    for e in err.errors():
        loc: Loc = tuple(e["loc"])
        if e["type"] == LOCATED_ERROR_TYPE:
            loc = loc + tuple(e.get("ctx", {}).get("loc", ()))
        problems.append((format_loc(loc, prefix), _reason(e)))
    return problems


#: The most problems one message lists (a document of 6,000 wrong items is 6,000 problems);
#: the others are counted in its last line.
MOST_PROBLEMS = 50


def format_pydantic_error(err: pydantic.ValidationError, prefix: str = "") -> str:
    """One ``key.path[0].sub: reason`` line per error, joined with newlines: the first
    ``MOST_PROBLEMS``, then ``... and N more problems``.

    ``prefix`` is put in front of every path (``spec`` -> ``spec.uri``).  An
    error about the whole document (no path) is just its reason.
    """
    problems = pydantic_problems(err, prefix)
    lines = [f"{path}: {reason}" if path else reason for path, reason in problems[:MOST_PROBLEMS]]
    if len(problems) > MOST_PROBLEMS:
        lines.append(f"... and {len(problems) - MOST_PROBLEMS} more problems")
    return "\n".join(lines)


# --------------------------------------------------------------------- encoding


def dump_yaml(data: Any) -> str:
    """Plain data as block YAML, keys in their given order."""
    return yaml.safe_dump(data, sort_keys=False, allow_unicode=True, default_flow_style=False)


def dump_json(data: Any) -> str:
    """Plain data as JSON indented by two spaces, with a trailing newline."""
    return orjson.dumps(data, option=orjson.OPT_INDENT_2).decode() + "\n"

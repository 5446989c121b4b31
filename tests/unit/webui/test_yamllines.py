"""Each problem of `bastion create`'s message is placed at the line of its key."""

from __future__ import annotations

from bastion.webui.yamllines import Problem, line_of, path_parts, problems

TEXT = """\
kind: role
metadata:
  name: x
  labels: {"a.b/c": "1"}
spec:
  allow:
    mcp: {tools: 5}
    app_labels:
      env: [dev, prod]
"""


def test_path_parts() -> None:
    assert path_parts('spec.allow.mcp.tools[0]["a.b"]') == ["spec", "allow", "mcp", "tools", 0, "a.b"]


def test_line_of_keys_lists_and_quoted_keys() -> None:
    assert line_of(TEXT, "spec.allow.mcp.tools") == 7
    assert line_of(TEXT, "spec.allow.app_labels.env[1]") == 9
    assert line_of(TEXT, 'metadata.labels["a.b/c"]') == 4
    # A missing key: the deepest part found.
    assert line_of(TEXT, "spec.allow.nothing.here") == 6
    assert line_of("kind: [", "kind") == 0


def test_problems_of_a_message() -> None:
    message = "invalid role:\nspec.allow.mcp.tools: expected a list, got an integer\nspec.deny: unknown field"
    assert problems(TEXT, message) == [
        Problem(0, "invalid role:"),
        Problem(7, "spec.allow.mcp.tools: expected a list, got an integer"),
        Problem(5, "spec.deny: unknown field"),
    ]

"""docs/training.md lists every error message the tools (`craft train | convert | merge | export-gguf | inspect`)
can give: the list between its `errors:begin` / `errors:end` markers is generated from the source (every
`raise UserError(...)`, and the `ValueError`s the config validators turn into one) and must match it.

After changing or adding an error, rewrite the list with `python tests/test_docs_errors.py`.
"""

from __future__ import annotations

import ast
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DOC = REPO / "docs" / "training.md"
BEGIN, END = "<!-- errors:begin -->", "<!-- errors:end -->"
# The modules behind the tools; engine/config.py's validators raise ValueError (the cross-key ones collect `conflicts` first), reported as a UserError, and its
# `_describe` returns the messages of pydantic's own errors (unknown / missing keys, wrong types).
SOURCES = ["cli.py", "errors.py", "quiet.py", "engine", "export", "adapters"]
VALIDATORS = {"engine/config.py"}
DESCRIBERS = {("engine/config.py", "_describe")}


def _template(node: ast.AST) -> list[str]:
    """The message(s) an expression can produce, formatted values shown as '…'."""
    if isinstance(node, ast.Constant) and isinstance(node.value, str):
        return [node.value]
    if isinstance(node, ast.JoinedStr):
        return ["".join(v.value if isinstance(v, ast.Constant) else "…" for v in node.values)]
    if isinstance(node, ast.IfExp):
        return _template(node.body) + _template(node.orelse)
    if isinstance(node, ast.BinOp) and isinstance(node.op, ast.Add):
        return [a + b for a in _template(node.left) for b in _template(node.right)]
    return []  # a re-raise of a message built elsewhere (e.g. `UserError(error)`)


def error_messages() -> dict[str, list[str]]:
    """module path -> sorted unique message templates raised there."""
    root = REPO / "src" / "craft"
    files = sorted(p for name in SOURCES for p in ([root / name] if name.endswith(".py") else
                                                  (root / name).rglob("*.py")))
    out = {}
    for path in files:
        relative = path.relative_to(root).as_posix()
        kinds = {"UserError"} | ({"ValueError"} if relative in VALIDATORS else set())
        found = set()
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            if isinstance(node, ast.Raise) and isinstance(node.exc, ast.Call) and node.exc.args and \
                    isinstance(node.exc.func, ast.Name) and node.exc.func.id in kinds:
                found.update(t.strip() for t in _template(node.exc.args[0]))
            if relative in VALIDATORS and isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and \
                    node.func.attr == "append" and isinstance(node.func.value, ast.Name) and \
                    node.func.value.id == "conflicts":  # the cross-key conflicts, raised together as one ValueError
                found.update(t.strip() for t in _template(node.args[0]))
            if isinstance(node, ast.FunctionDef) and (relative, node.name) in DESCRIBERS:
                found.update(t.strip() for r in ast.walk(node) if isinstance(r, ast.Return) and r.value
                             for t in _template(r.value))
        if found:
            out[relative] = sorted(found)
    return out


def render() -> str:
    lines = [BEGIN]
    for module, messages in error_messages().items():
        lines += ["", f"`src/craft/{module}`:", ""]
        lines += [f"- `{m.replace('`', chr(39))}`" for m in messages]
    return "\n".join(lines + ["", END])


def current() -> str:
    text = DOC.read_text()
    return text[text.index(BEGIN):text.index(END) + len(END)]


def test_training_doc_lists_every_error_message():
    assert current() == render(), "docs/training.md's error list is stale: run `python tests/test_docs_errors.py`"


def test_the_list_is_not_trivially_empty():
    messages = error_messages()
    assert "engine/config.py" in messages and "export/merge.py" in messages
    assert any("holds pickle files" in m for m in messages["engine/checkpoint.py"])


if __name__ == "__main__":
    text = DOC.read_text()
    DOC.write_text(text.replace(current(), render()) if BEGIN in text else text)
    sys.exit(0 if BEGIN in text else f"add the markers {BEGIN} / {END} to {DOC} first")

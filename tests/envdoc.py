"""deploy/env.example against chatproject/settings.py: every variable settings.py reads is
documented there, nothing else is, and each commented-out default is the one settings.py uses.

No Django import: `.ci/check-deploy` runs it as `python -m tests.envdoc` before any server
starts, and tests/test_security_checks.py runs it in the suite.
"""

from __future__ import annotations

import ast
import operator
import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
_ARITHMETIC = {ast.Mult: operator.mul, ast.Add: operator.add, ast.Sub: operator.sub}


def _reads_env(call: ast.Call) -> bool:
    func = call.func
    return (isinstance(func, ast.Name) and func.id == "env") or (
        isinstance(func, ast.Attribute)
        and isinstance(func.value, ast.Name)
        and func.value.id == "env"
    )


def _constant(node: ast.AST | None):
    """The value of a literal default (`5.0`, `"60/min"`, `64 * 1024`); None for anything else."""
    if isinstance(node, ast.Constant):
        return node.value
    if isinstance(node, ast.BinOp) and type(node.op) in _ARITHMETIC:
        left, right = _constant(node.left), _constant(node.right)
        if isinstance(left, int | float) and isinstance(right, int | float):
            return _ARITHMETIC[type(node.op)](left, right)
    return None


def settings_defaults(settings: str) -> dict[str, object]:
    """Each variable settings.py reads, with its literal default (None if not a literal)."""
    read: dict[str, object] = {}
    for node in ast.walk(ast.parse(settings)):
        if not (isinstance(node, ast.Call) and _reads_env(node) and node.args):
            continue
        name = node.args[0]
        if isinstance(name, ast.Constant) and isinstance(name.value, str):
            default = next((k.value for k in node.keywords if k.arg == "default"), None)
            read[name.value] = _constant(default)
    return read


def documented(example: str) -> dict[str, tuple[str, bool]]:
    """NAME -> (value, commented out) for every `NAME=value` or `#NAME=value` line."""
    return {
        match["name"]: (match["value"], bool(match["hash"]))
        for match in re.finditer(
            r"^(?P<hash>#?)(?P<name>[A-Z][A-Z0-9_]*)=(?P<value>.*)$", example, re.MULTILINE
        )
    }


def _same(value: str, default: object) -> bool:
    if isinstance(default, bool):
        return value.lower() in (("1", "true", "on", "yes") if default else ("0", "false", "off"))
    if isinstance(default, int | float):
        try:
            return float(value) == float(default)
        except ValueError:
            return False
    return value == str(default)


def problems(settings: str, example: str) -> list[str]:
    read, docs = settings_defaults(settings), documented(example)
    found = []
    if missing := sorted(set(read) - set(docs)):
        found.append(f"undocumented: {missing}")
    if unknown := sorted(set(docs) - set(read)):
        found.append(f"not read by settings.py: {unknown}")
    for name, (value, commented) in sorted(docs.items()):
        default = read.get(name)
        if commented and default is not None and not _same(value, default):
            found.append(f"#{name}={value} but settings.py defaults to {default!r}")
    return found


def main() -> int:
    settings = (ROOT / "chatproject" / "settings.py").read_text()
    example = (ROOT / "deploy" / "env.example").read_text()
    if found := problems(settings, example):
        for line in found:
            print(f"   FAIL: env.example: {line}", file=sys.stderr)
        return 1
    count = len(settings_defaults(settings))
    print(f"   ok: env.example names all {count} variables settings.py reads, with their defaults")
    return 0


if __name__ == "__main__":
    sys.exit(main())

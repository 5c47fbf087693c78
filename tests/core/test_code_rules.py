"""Rules of STYLE.md the code can check by itself."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2] / "curate"
LIMIT = 80
MARK = "# Over 80 lines:"  # the reason, in the comment block right above the def (or its decorators)


def long_functions(root: Path = ROOT) -> list[tuple[str, int, str, int, bool]]:
    """(file, line, name, length, has a reason) of every function longer than LIMIT lines."""
    out = []
    for path in sorted(root.rglob("*.py")):
        lines = path.read_text().splitlines()
        for node in ast.walk(ast.parse("\n".join(lines), str(path))):
            if not isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                continue
            length = node.end_lineno - node.lineno + 1
            if length <= LIMIT:
                continue
            # the comment block right above the def (or its decorators) must hold the reason
            i = min([node.lineno, *(d.lineno for d in node.decorator_list)]) - 2
            block = []
            while i >= 0 and lines[i].strip().startswith("#"):
                block.append(lines[i].strip())
                i -= 1
            reason = any(c.startswith(MARK) for c in block)
            out.append((str(path.relative_to(root.parent)), node.lineno, node.name, length, reason))
    return out


def test_no_function_over_80_lines_without_a_reason_above_it():
    bare = [f"{f}:{line} {name} ({n} lines)" for f, line, name, n, reason in long_functions() if not reason]
    assert bare == [], f"functions over {LIMIT} lines need a '{MARK} ...' comment right above them: {bare}"


def test_the_rule_sees_a_long_function_and_its_reason(tmp_path):
    body = "\n".join(f"    x{i} = {i}" for i in range(LIMIT))
    (tmp_path / "m.py").write_text(f"def short():\n    pass\n\n\ndef bare():\n{body}\n\n\n"
                                   f"{MARK} one pass over the stream\n@staticmethod\ndef kept():\n{body}\n")
    found = {name: reason for _, _, name, _, reason in long_functions(tmp_path)}
    assert found == {"bare": False, "kept": True}


if __name__ == "__main__":  # pragma: no cover - a quick listing for whoever splits functions
    for row in long_functions():
        print(*row)
    pytest.main([__file__])

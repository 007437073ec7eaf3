"""The code blocks of the README and the docs, and how their shown output is compared.

Used by ``tests/test_docs_examples.py``; also run as a script by another environment's
interpreter (the KServe SDK's, whose pins differ from the service's), so it imports only
the standard library at the top and NumPy where a value needs it:

    .venv-kserve/bin/python tests/doc_examples.py python BLOCK.py   # prints a JSON report

Conventions the docs follow:

* ``console`` blocks: ``$ command`` lines (a line ending in ``\\`` goes on), each followed
  by what it prints. A line ``...`` in the output stands for any number of lines; JSON
  output is compared as values: ``...`` as a list item stands for the rest of the list,
  as a dict item for the other keys, a string ``"..."`` for any string, a string ending in
  ``...`` for any string it begins; floats may differ in the last digits.
* ``python`` blocks: an expression statement with a comment at the end of its line shows
  its value there (``client.classify(image=seven)["digit"]  # 7``), compared the same way.
  A comment at the end of any other statement is prose.
* A block that is not to be run has ``<!-- not run: reason -->`` on the line before it.
"""

from __future__ import annotations

import ast
import asyncio
import inspect
import io
import json
import math
import re
import sys
import tokenize
from dataclasses import dataclass
from pathlib import Path
from typing import Any

NOT_RUN = re.compile(r"^<!--\s*not run:\s*(?P<reason>.*?)\s*-->$")
FENCE = re.compile(r"^(?P<indent>\s*)(?P<fence>`{3,}|~{3,})\s*(?P<lang>[\w+-]*)")
RUN_LANGUAGES = {"console", "python"}
SHELL_LANGUAGES = {"bash", "sh", "shell", "console"}


@dataclass(frozen=True)
class Block:
    path: Path
    line: int  # of the opening fence, 1-based
    lang: str
    text: str
    not_run: str | None  # the reason, when marked

    @property
    def name(self) -> str:
        return f"{self.path.name}:{self.line}"


def blocks(path: Path) -> list[Block]:
    """Every fenced code block of a Markdown file, in order."""
    lines = path.read_text().splitlines()
    found: list[Block] = []
    index = 0
    while index < len(lines):
        opening = FENCE.match(lines[index])
        if not opening:
            index += 1
            continue
        fence, indent = opening["fence"], len(opening["indent"])
        body: list[str] = []
        end = index + 1
        while end < len(lines) and not lines[end].strip().startswith(fence):
            body.append(lines[end][indent:] if lines[end][:indent].isspace() else lines[end])
            end += 1
        previous = next((lines[i].strip() for i in range(index - 1, -1, -1) if lines[i].strip()),
                        "")  # fmt: skip
        marker = NOT_RUN.match(previous)
        found.append(Block(path, index + 1, opening["lang"].lower(), "\n".join(body) + "\n",
                           marker["reason"] if marker else None))  # fmt: skip
        index = end + 1
    return found


def prose(path: Path) -> str:
    """A Markdown file without its fenced code blocks."""
    text, keep = [], True
    for line in path.read_text().splitlines():
        if FENCE.match(line):
            keep = not keep
            continue
        if keep:
            text.append(line)
    return "\n".join(text)


# --- console blocks ----------------------------------------------------------------------


def console_commands(text: str) -> list[tuple[str, str]]:
    """A console block's (command, shown output) pairs."""
    pairs: list[tuple[str, list[str]]] = []
    lines = text.splitlines()
    index = 0
    while index < len(lines):
        line = lines[index]
        if line.startswith("$ "):
            command = [line[2:]]
            while command[-1].endswith("\\") and index + 1 < len(lines):
                index += 1
                command.append(lines[index])
            pairs.append(("\n".join(command), []))
        elif pairs:
            pairs[-1][1].append(line)
        elif line.strip():
            raise ValueError(f"output before any command: {line!r}")
        index += 1
    return [(command, "\n".join(output).strip("\n")) for command, output in pairs]


# --- shown values ------------------------------------------------------------------------


class ArrayValue:
    """``array([...], dtype=...)`` as a NumPy array's repr shows it."""

    def __init__(self, values: Any, dtype: Any = None) -> None:
        self.values, self.dtype = values, dtype

    def __repr__(self) -> str:
        return f"array({self.values!r}, dtype={self.dtype!r})"


_OPEN_DICT = re.compile(r"(?<=[{,])(\s*)\.\.\.(\s*)(?=[,}])")
_NAMES = {"true": "True", "false": "False", "null": "None"}


def shown_value(text: str) -> Any:
    """A value as the docs show it: JSON or a Python repr, with ``...`` where parts are
    left out. Raises ValueError when the text is neither."""
    source = _OPEN_DICT.sub(r'\1"...": ...\2', text.strip())
    try:
        tokens = [
            (token.type, _NAMES.get(token.string, token.string))
            if token.type == tokenize.NAME
            else (token.type, token.string)
            for token in tokenize.generate_tokens(io.StringIO(source).readline)
        ]
        source = tokenize.untokenize(tokens)
        names = {"array": ArrayValue, "object": object, "__builtins__": {}}
        return eval(compile(source, "<shown>", "eval"), names)  # the repository's own text
    except (SyntaxError, tokenize.TokenError, NameError, TypeError) as error:
        raise ValueError(f"not a value: {text!r} ({error})") from None


def mismatch(actual: Any, expected: Any, where: str = "") -> str | None:
    """Why ``actual`` is not what the docs show as ``expected``; None when it is."""
    here = where or "the value"
    if expected is Ellipsis:
        return None
    if hasattr(actual, "tolist") and not isinstance(actual, str | bytes):
        if isinstance(expected, ArrayValue):
            import numpy as np

            if expected.dtype is not None and actual.dtype != np.dtype(expected.dtype):
                return f"{here}: dtype {actual.dtype}, shown {expected.dtype}"
            expected = expected.values
        actual = actual.tolist()
    elif isinstance(expected, ArrayValue):
        return f"{here}: {actual!r} is not an array"
    if isinstance(expected, dict):
        if not isinstance(actual, dict):
            return f"{here}: {actual!r} is not an object"
        open_ = expected.get("...", None) is Ellipsis
        shown = {key: value for key, value in expected.items() if key != "..."}
        missing = set(shown) - set(actual)
        extra = set(actual) - set(shown)
        if missing or (extra and not open_):
            return f"{here}: keys {sorted(actual)}, shown {sorted(shown)}"
        for key, value in shown.items():
            found = mismatch(actual[key], value, f"{where}[{key!r}]")
            if found:
                return found
        return None
    if isinstance(expected, list | tuple):
        if not isinstance(actual, list | tuple):
            return f"{here}: {actual!r} is not a sequence"
        if isinstance(expected, tuple) != isinstance(actual, tuple):
            return f"{here}: {type(actual).__name__}, shown {type(expected).__name__}"
        items = list(expected)
        open_ = bool(items) and items[-1] is Ellipsis
        if open_:
            items.pop()
        if len(actual) < len(items) or (len(actual) != len(items) and not open_):
            return f"{here}: {len(actual)} items, shown {len(items)}{' or more' if open_ else ''}"
        for index, value in enumerate(items):
            found = mismatch(actual[index], value, f"{where}[{index}]")
            if found:
                return found
        return None
    if isinstance(expected, str):
        if not isinstance(actual, str):
            return f"{here}: {actual!r} is not a string"
        if expected == "...":
            return None
        if expected.endswith("...") and actual.startswith(expected[:-3]):
            return None
        return None if actual == expected else f"{here}: {actual!r}, shown {expected!r}"
    if isinstance(expected, bool) or expected is None:
        return None if actual is expected else f"{here}: {actual!r}, shown {expected!r}"
    if isinstance(expected, int):
        if isinstance(actual, bool) or not isinstance(actual, int):
            return f"{here}: {actual!r}, shown {expected!r}"
        return None if actual == expected else f"{here}: {actual!r}, shown {expected!r}"
    if isinstance(expected, float):
        if isinstance(actual, bool) or not isinstance(actual, int | float):
            return f"{here}: {actual!r}, shown {expected!r}"
        close = math.isclose(actual, expected, rel_tol=1e-4, abs_tol=1e-6)
        return None if close else f"{here}: {actual!r}, shown {expected!r}"
    return None if actual == expected else f"{here}: {actual!r}, shown {expected!r}"


def _json(text: str) -> tuple[bool, Any]:
    try:
        return True, json.loads(text)
    except ValueError:
        return False, None


def output_mismatch(actual: str, shown: str) -> str | None:
    """Why a command's output is not what the docs show; None when it is."""
    actual_lines = [line.rstrip() for line in actual.replace("\r\n", "\n").strip("\n").split("\n")]
    shown_lines = [line.rstrip() for line in shown.strip("\n").split("\n")]
    if len(shown_lines) > 1 and shown_lines[0].startswith(("{", "[")):
        parsed, value = _json("\n".join(actual_lines))
        if parsed:
            return mismatch(value, shown_value("\n".join(shown_lines)))

    def line_mismatch(got: str, want: str) -> str | None:
        if want.startswith(("{", "[")):
            parsed, value = _json(got)
            if parsed:
                return mismatch(value, shown_value(want))
        if want.endswith("...") and got.startswith(want[:-3]):
            return None
        return None if got == want else f"{got!r}, shown {want!r}"

    def match(i: int, j: int) -> tuple[int, str] | None:
        """None when shown_lines[i:] matches actual_lines[j:], else (how far, why not)."""
        if i == len(shown_lines):
            return None if j == len(actual_lines) else (i, f"more output: {actual_lines[j]!r}")
        if shown_lines[i] == "...":
            furthest = (i, "")
            for k in range(j, len(actual_lines) + 1):
                failed = match(i + 1, k)
                if failed is None:
                    return None
                furthest = max(furthest, failed, key=lambda found: found[0])
            return furthest
        if j == len(actual_lines):
            return i, f"the output ends before {shown_lines[i]!r}"
        reason = line_mismatch(actual_lines[j], shown_lines[i])
        return (i, reason) if reason else match(i + 1, j + 1)

    failed = match(0, 0)
    return None if failed is None else failed[1]


# --- python blocks -----------------------------------------------------------------------


def trailing_comments(source: str) -> dict[int, str]:
    """Line number → the comment that ends a line of code."""
    comments = {}
    for token in tokenize.generate_tokens(io.StringIO(source).readline):
        if token.type == tokenize.COMMENT and token.line[: token.start[1]].strip():
            comments[token.start[0]] = token.string[1:].strip()
    return comments


class _Shown(ast.NodeTransformer):
    def __init__(self, comments: dict[int, str]) -> None:
        self.comments = comments

    def visit_Expr(self, node: ast.Expr) -> ast.AST:
        if node.end_lineno in self.comments:
            call = ast.Call(ast.Name("__shown__", ast.Load()),
                            [node.value, ast.Constant(node.end_lineno)], [])  # fmt: skip
            return ast.copy_location(ast.Expr(call), node)
        return node


def run_python(source: str, filename: str = "<docs>") -> tuple[int, list[str]]:
    """Run a python block; (values compared, what differed from the shown values)."""
    comments = trailing_comments(source)
    problems: list[str] = []
    checked = 0

    def shown(value: Any, line: int) -> Any:
        nonlocal checked
        checked += 1
        try:
            found = mismatch(value, shown_value(comments[line]))
        except ValueError as error:
            found = str(error)
        if found:
            problems.append(f"line {line}: {found} (the value: {value!r:.300})")
        return value

    tree = ast.fix_missing_locations(_Shown(comments).visit(ast.parse(source, filename)))
    code = compile(tree, filename, "exec", flags=ast.PyCF_ALLOW_TOP_LEVEL_AWAIT)
    result = eval(code, {"__shown__": shown, "__name__": "__docs__"})  # the repository's own
    if inspect.iscoroutine(result):
        asyncio.run(result)
    return checked, problems


if __name__ == "__main__":
    # python tests/doc_examples.py python FILE: run a block, print {"checked", "problems"}.
    if sys.argv[1:2] != ["python"] or len(sys.argv) != 3:
        raise SystemExit(__doc__)
    count, found = run_python(Path(sys.argv[2]).read_text(), sys.argv[2])
    print(json.dumps({"checked": count, "problems": found}))

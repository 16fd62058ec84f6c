"""Random one-line breaks: flip an operator somewhere in the package and see whether the tests notice.

Where `mutation_check.py` keeps a curated list of breaks at places that matter, this draws them at random, the
way an outside check would: one operator a run (`==`/`!=`, `<`/`<=`, `>`/`>=`, `in`/`not in`, `is`/`is not`,
`and`/`or`, `True`/`False`, `+`/`-`, `*`/`/`, a small integer constant off by one, a `not` dropped), found with
`ast` in the chosen modules, in a temporary copy of the repository. Each break runs the test files that name its
module (the module's own `tests/test_<name>.py` first, then the files that import it most, at most `--files`),
with `-x`. *Caught*: they fail; *survived*: they pass (a hole in the tests, or an equivalent break: read each);
*timeout*: the run hung (a break that loops counts as caught by an outside check too, but say which).

    python scripts/random_mutations.py --seed 1 --n 20                  # 20 breaks anywhere in qwennb/
    python scripts/random_mutations.py --seed 1 --n 10 --modules batch,lora --out /tmp/mut.jsonl

A line of JSON a break goes to `--out` as it ends, so a long run can be read (and stopped) at any time.
"""

from __future__ import annotations

import argparse
import ast
import json
import random
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from mutation_check import ROOT, _copy_repo, _run_tests  # noqa: E402

_SWAPS: dict[type, type] = {
    ast.Eq: ast.NotEq,
    ast.NotEq: ast.Eq,
    ast.Lt: ast.LtE,
    ast.LtE: ast.Lt,
    ast.Gt: ast.GtE,
    ast.GtE: ast.Gt,
    ast.In: ast.NotIn,
    ast.NotIn: ast.In,
    ast.Is: ast.IsNot,
    ast.IsNot: ast.Is,
    ast.And: ast.Or,
    ast.Or: ast.And,
    ast.Add: ast.Sub,
    ast.Sub: ast.Add,
    ast.Mult: ast.Div,
    ast.Div: ast.Mult,
}


@dataclass
class Break:
    module: str
    line: int
    old: str
    new: str
    outcome: str = ""
    tests: str = ""
    seconds: float = 0.0


def _sites(tree: ast.AST) -> list[tuple[ast.AST, str]]:
    """Every node a break can be made at, with how."""
    sites: list[tuple[ast.AST, str]] = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Compare) and type(node.ops[0]) in _SWAPS:
            sites.append((node, "compare"))
        elif isinstance(node, ast.BoolOp):
            sites.append((node, "boolop"))
        elif (
            isinstance(node, ast.BinOp)
            and type(node.op) in _SWAPS
            and not isinstance(node.left, ast.Constant)
        ):
            sites.append((node, "binop"))
        elif isinstance(node, ast.Constant) and isinstance(node.value, bool):
            sites.append((node, "bool"))
        elif (
            isinstance(node, ast.Constant)
            and type(node.value) is int
            and 0 <= node.value <= 64
            and node.lineno == node.end_lineno
        ):
            sites.append((node, "int"))
        elif isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.Not):
            sites.append((node, "not"))
    return sites


def _mutated(source: str, node: ast.AST, how: str) -> tuple[int, str, str] | None:
    """The module with one break at `node`, as (line, old line, new line); None where it cannot be made."""
    lines = source.splitlines(keepends=True)
    if how == "compare":
        node.ops[0] = _SWAPS[type(node.ops[0])]()
    elif how == "boolop":
        node.op = _SWAPS[type(node.op)]()
    elif how == "binop":
        node.op = _SWAPS[type(node.op)]()
    elif how == "bool":
        node.value = not node.value
    elif how == "int":
        node.value = node.value + 1
    if node.lineno != node.end_lineno:
        return None  # one-line breaks only: a node over several lines would be re-set by ast.unparse
    line = lines[node.lineno - 1]
    start, end = node.col_offset, node.end_col_offset
    # col offsets count UTF-8 bytes
    raw = line.encode()
    new = (raw[:start] + ast.unparse(node).encode() + raw[end:]).decode()
    return (node.lineno, line, new) if new != line else None


def draw(modules: list[Path], n: int, seed: int) -> list[Break]:
    rng = random.Random(seed)
    breaks: list[Break] = []
    tries = 0
    while len(breaks) < n and tries < n * 50:
        tries += 1
        path = rng.choice(modules)
        source = path.read_text()
        tree = ast.parse(source)
        sites = [s for s in _sites(tree) if not _in_docstring_or_log(s[0], source)]
        if not sites:
            continue
        node, how = rng.choice(sites)
        if how == "not":  # drop the `not`: the line up to it, then the operand on
            if node.lineno != node.end_lineno:
                continue
            line = source.splitlines(keepends=True)[node.lineno - 1]
            raw = line.encode()
            made = (node.lineno, line, (raw[: node.col_offset] + raw[node.operand.col_offset :]).decode())
        else:
            made = _mutated(source, node, how)
        if made is None:
            continue
        lineno, old, new = made
        try:
            lines = source.splitlines(keepends=True)
            lines[lineno - 1] = new
            ast.parse("".join(lines))
        except SyntaxError:
            continue
        rel = str(path.relative_to(ROOT))
        if any(b.module == rel and b.line == lineno for b in breaks):
            continue
        breaks.append(Break(rel, lineno, old.rstrip("\n"), new.rstrip("\n")))
    return breaks


def _in_docstring_or_log(node: ast.AST, source: str) -> bool:
    """Breaks in text a user reads (messages) are cosmetic: skip lines that are only a string being built."""
    line = source.splitlines()[node.lineno - 1].strip()
    return line.startswith(("#", '"', "f'", 'f"', "'", "log.", "logger.", "print(", "warnings.warn("))


def tests_for(module: str, limit: int) -> list[str]:
    """The test files that use a module: its own first, then by how often they name it."""
    name = Path(module).stem
    own = ROOT / "tests" / f"test_{name}.py"
    tree = ast.parse((ROOT / module).read_text())
    public = [  # what the module defines, as tests name it (`from qwennb.compat import ModelDetectionService`)
        n.name
        for n in tree.body
        if isinstance(n, (ast.FunctionDef, ast.ClassDef)) and not n.name.startswith("_") and len(n.name) >= 6
    ]
    counts: list[tuple[int, str]] = []
    for f in sorted((ROOT / "tests").glob("test_*.py")):
        if f == own or f.name in ("test_browser.py", "test_notebooks.py"):
            continue
        text = f.read_text()
        hits = text.count(f"qwennb.{name}") + text.count(f"qwennb import {name}") + text.count(f" {name}.")
        hits += sum(text.count(p) for p in public)
        if hits:
            counts.append((hits, str(f.relative_to(ROOT))))
    chosen = [str(own.relative_to(ROOT))] if own.exists() else []
    chosen += [p for _, p in sorted(counts, reverse=True)][: max(0, limit - len(chosen))]
    return chosen


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--n", type=int, default=20, help="how many breaks (default 20)")
    ap.add_argument("--modules", help="comma-separated module names under qwennb/ (default: all)")
    ap.add_argument("--files", type=int, default=2, help="test files a break runs at most (default 2)")
    ap.add_argument("--timeout", type=float, default=300, help="seconds a run (default 300)")
    ap.add_argument("--out", help="append one JSON line a break here")
    args = ap.parse_args(argv)
    if args.modules:
        modules = [ROOT / "qwennb" / f"{m.strip().removesuffix('.py')}.py" for m in args.modules.split(",")]
        missing = [str(m) for m in modules if not m.exists()]
        if missing:
            ap.error(f"no such module: {', '.join(missing)}")
    else:
        modules = sorted(p for p in (ROOT / "qwennb").glob("*.py") if p.name != "__init__.py")
    breaks = draw(modules, args.n, args.seed)
    with tempfile.TemporaryDirectory(prefix="qwennb-random-mutation-") as tmp:
        work = Path(tmp)
        _copy_repo(work)
        for b in breaks:
            tests = tests_for(b.module, args.files)
            if not tests:
                b.outcome = "no tests"
            else:
                path = work / b.module
                source = path.read_text()
                lines = source.splitlines(keepends=True)
                lines[b.line - 1] = b.new + "\n"
                path.write_text("".join(lines))
                try:
                    b.outcome, b.seconds = _run_tests(work, tuple(tests), args.timeout)
                finally:
                    path.write_text(source)
                b.tests = " ".join(tests)
            print(f"{b.outcome:<9} {b.module}:{b.line}  {b.old.strip()}  ->  {b.new.strip()}", flush=True)
            if args.out:
                with open(args.out, "a") as f:
                    f.write(json.dumps(asdict(b), ensure_ascii=False) + "\n")
    caught = sum(b.outcome in ("caught", "timeout") for b in breaks)
    print(f"\n{caught} of {len(breaks)} caught ({time.process_time():.0f} s CPU here)")
    return 0


if __name__ == "__main__":
    sys.exit(main())

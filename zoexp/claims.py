"""The papers' claims about a table, checked on the rendered cells -- the paper's numbers and ours.

A table's sweep config (``conf/experiment/<table>.yaml``, key ``sweep.claims``) lists what the paper's
text says about the table, each claim as the paper's words and one check::

    claims:
      - text: "FOCUS's memory is far below HiZOO's (at most 0.6x)"
        source: "§5.1 Memory Efficiency"
        check: "cell(focus, mem) <= 0.6 * cell(hizoo, mem)"

The check language is small and parsed here (nothing is ``eval``-ed):

- ``cell(ROW, COL)`` is the value of a rendered cell (row and column keys of the table's layout,
  ``zoexp/paper_tables/<table>.yaml``; ``cell(ROW, COL, PANEL)`` picks a panel by index where a key
  pair occurs in several). The check is evaluated twice: once with the paper's numbers in the cells,
  once with ours. ``paper(ROW, COL)`` is always the paper's number (e.g. "ours within 2 points of it").
- ``*`` or ``[a, b, c]`` in place of a key gives a vector over those rows or columns (``*``: every
  data column / row of the panel, not aggregates, relative or paper-only ones). Arithmetic and
  comparisons work element by element (two vectors over different keys pair them by position,
  e.g. ``cell([r1-nu50, r1-nu100], a) < cell([r2-nu50, r2-nu100], a)``); ``count``, ``share`` (fraction true), ``all``, ``any``,
  ``mean``, ``min``, ``max`` reduce a vector; ``abs`` works on either.
- numbers, ``+ - * /``, ``< <= > >= == !=``, ``and``, ``or``, ``not`` and parentheses.

A claim may carry ``paper_fails: "<why>"`` where the paper's own numbers contradict its text (the
check then gives ✗ on the paper's numbers; the tests require the note exactly there). A check's
verdict is ✓ or ✗, or "not measurable here" with the reason when a cell it needs has no
number (not run, not in this profile, failed, the paper printing text). Vector positions without a
number on either side are left out and the result says on how many positions it was measured.
"""

from __future__ import annotations

import math
import re
import statistics
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

PASS, FAIL, NOT_MEASURABLE = "✓", "✗", "not measurable here"
_OPS = ("<=", ">=", "==", "!=", "<", ">")
_REF = re.compile(r"\b(cell|paper)\s*\(([^()]*)\)")
_TOKEN = re.compile(r"\s*(?:(?P<keys>@\d+)|(?P<num>\d+(?:\.\d*)?(?:[eE][-+]?\d+)?)|(?P<name>[A-Za-z_]\w*)"
                    r"|(?P<op><=|>=|==|!=|[-+*/<>(),\[\]]))")
_REDUCERS = ("count", "share", "all", "any", "mean", "min", "max")
_FUNCTIONS = ("cell", "paper", "abs", *_REDUCERS)


class ClaimError(ValueError):
    """A check that does not parse or refers to keys the table does not have."""


# ----------------------------------------------------------------------------- values


@dataclass
class Missing:
    """No number here, and why (e.g. "focus/mem: no run")."""

    reasons: list[str]


@dataclass
class Vec:
    """A vector of values (numbers, booleans or Missing) with the labels of its positions."""

    labels: list[str]
    items: list[Any]


@dataclass
class Reduced:
    """A reduction's result, with how many positions it was measured on (for the trace)."""

    value: Any
    used: int
    total: int
    left_out: list[str] = field(default_factory=list)
    hits: int | None = None  # true positions, for count/share/all/any


def _plain(v):
    return v.value if isinstance(v, Reduced) else v


# ----------------------------------------------------------------------------- parsing


@dataclass
class Node:
    kind: str  # num | ref | call | unary | binary | compare | logic | not
    value: Any = None
    args: list = field(default_factory=list)


def _tokens(text: str) -> list[tuple[str, str]]:
    out, pos = [], 0
    text = text.strip()
    while pos < len(text):
        m = _TOKEN.match(text, pos)
        if not m or m.end() == pos:
            raise ClaimError(f"cannot read {text[pos:]!r} in check {text!r}")
        pos = m.end()
        kind = m.lastgroup
        out.append((kind, m.group(kind)))
    return out


class _Parser:
    """Recursive descent over: or > and > not > comparison > sum > product > unary > atom."""

    def __init__(self, text: str):
        self.text = text
        # cell(...) / paper(...) arguments are keys, not expressions (opt-1.3b, 30b-zero-shot, *, [a, b]):
        # cut them out before tokenizing, as @N
        self.refs: list[list] = []

        def keep(m: re.Match) -> str:
            self.refs.append(_split_keys(m.group(2)))
            return f"{m.group(1)}(@{len(self.refs) - 1})"

        self.toks = _tokens(_REF.sub(keep, text))
        self.i = 0

    def peek(self) -> tuple[str, str] | None:
        return self.toks[self.i] if self.i < len(self.toks) else None

    def take(self, value: str | None = None) -> tuple[str, str]:
        tok = self.peek()
        if tok is None or (value is not None and tok[1] != value):
            raise ClaimError(f"expected {value or 'more'} in check {self.text!r}")
        self.i += 1
        return tok

    def parse(self) -> Node:
        node = self.logic()
        if self.peek() is not None:
            raise ClaimError(f"unexpected {self.peek()[1]!r} in check {self.text!r}")
        return node

    def logic(self, level: str = "or") -> Node:
        sub = (lambda: self.logic("and")) if level == "or" else self.negation
        node = sub()
        while self.peek() == ("name", level):
            self.take()
            node = Node("logic", level, [node, sub()])
        return node

    def negation(self) -> Node:
        if self.peek() == ("name", "not"):
            self.take()
            return Node("not", args=[self.negation()])
        return self.comparison()

    def comparison(self) -> Node:
        node = self.sum()
        tok = self.peek()
        if tok and tok[1] in _OPS:
            self.take()
            node = Node("compare", tok[1], [node, self.sum()])
        return node

    def sum(self) -> Node:
        node = self.product()
        while self.peek() and self.peek()[1] in "+-" and self.peek()[0] == "op":
            op = self.take()[1]
            node = Node("binary", op, [node, self.product()])
        return node

    def product(self) -> Node:
        node = self.unary()
        while self.peek() and self.peek()[1] in ("*", "/"):
            op = self.take()[1]
            node = Node("binary", op, [node, self.unary()])
        return node

    def unary(self) -> Node:
        if self.peek() == ("op", "-"):
            self.take()
            return Node("unary", "-", [self.unary()])
        return self.atom()

    def atom(self) -> Node:
        kind, value = self.take()
        if kind == "num":
            return Node("num", float(value))
        if value == "(":
            node = self.logic()
            self.take(")")
            return node
        if kind == "name" and value in _FUNCTIONS:
            self.take("(")
            if value in ("cell", "paper"):
                kind, ref = self.take()
                if kind != "keys":
                    raise ClaimError(f"{value}(ROW, COL) takes keys in check {self.text!r}")
                self.take(")")
                return Node("ref", value, self.refs[int(ref[1:])])
            args = [self.logic()]
            self.take(")")
            return Node("call", value, args)
        raise ClaimError(f"unexpected {value!r} in check {self.text!r} (functions: {', '.join(_FUNCTIONS)})")

def _split_keys(raw: str) -> list:
    out, part, depth = [], "", 0
    for ch in raw + ",":
        if ch == "," and depth == 0:
            part = part.strip()
            if part.startswith("["):
                if not part.endswith("]"):
                    raise ClaimError(f"unbalanced [ in {raw!r}")
                out.append([k.strip() for k in part[1:-1].split(",") if k.strip()])
            elif part:
                out.append(part)
            else:
                raise ClaimError(f"empty key in {raw!r}")
            part = ""
            continue
        depth += ch == "["
        depth -= ch == "]"
        part += ch
    if not 2 <= len(out) <= 3:
        raise ClaimError(f"cell(ROW, COL[, PANEL]) takes 2 or 3 arguments, not {raw!r}")
    return out


def parse(check: str) -> Node:
    return _Parser(str(check)).parse()


# ----------------------------------------------------------------------------- evaluation

# lookup(row, col, panel) -> (value or None, why missing); keys(axis, panel) -> the keys of "*"
Lookup = Callable[[str, str, int | None], tuple[float | None, str]]


@dataclass
class Grid:
    """What a check can see of a table: each panel's data rows/columns and two ways to read a cell."""

    rows: list[list[str]]  # per panel: row keys that "*" stands for
    columns: list[list[str]]  # per panel: data column keys that "*" stands for
    all_rows: list[set[str]]
    all_columns: list[set[str]]
    ours: Lookup
    paper: Lookup

    def panel_of(self, row: str, col: str, panel: int | None, text: str) -> int:
        if panel is not None:
            if not 0 <= panel < len(self.rows):
                raise ClaimError(f"{text}: no panel {panel}")
            if row not in self.all_rows[panel] or col not in self.all_columns[panel]:
                raise ClaimError(f"{text}: panel {panel} has no cell ({row}, {col})")
            return panel
        found = [p for p in range(len(self.rows)) if row in self.all_rows[p] and col in self.all_columns[p]]
        if not found:
            raise ClaimError(f"{text}: the table has no cell ({row}, {col})")
        if len(found) > 1:
            raise ClaimError(f"{text}: ({row}, {col}) is in panels {found}; give the panel: cell({row}, {col}, N)")
        return found[0]


def _map(fn, *values):
    """Apply fn element by element (vectors broadcast against scalars); Missing propagates."""
    vecs = [v for v in values if isinstance(v, Vec)]
    if not vecs:
        missing = [r for v in values if isinstance(v, Missing) for r in v.reasons]
        return Missing(missing) if missing else fn(*values)
    if any(len(v.items) != len(vecs[0].items) for v in vecs):
        raise ClaimError(f"vectors of different lengths: {[v.labels for v in vecs]}")
    # same keys: element by element; different keys of the same length: paired by position
    labels = [" vs ".join(dict.fromkeys(v.labels[i] for v in vecs)) for i in range(len(vecs[0].items))]
    items = []
    for i in range(len(labels)):
        args = [v.items[i] if isinstance(v, Vec) else v for v in values]
        missing = [r for a in args if isinstance(a, Missing) for r in a.reasons]
        items.append(Missing(missing) if missing else fn(*args))
    return Vec(labels, items)


_ARITH = {"+": lambda a, b: a + b, "-": lambda a, b: a - b, "*": lambda a, b: a * b,
          "/": lambda a, b: a / b if b else math.nan}
_COMPARE = {"<": lambda a, b: a < b, "<=": lambda a, b: a <= b, ">": lambda a, b: a > b,
            ">=": lambda a, b: a >= b, "==": lambda a, b: math.isclose(a, b, rel_tol=1e-9, abs_tol=1e-12),
            "!=": lambda a, b: not math.isclose(a, b, rel_tol=1e-9, abs_tol=1e-12)}


def _reduce(name: str, value):
    if not isinstance(value, Vec):
        raise ClaimError(f"{name}() reduces a vector (a cell reference with * or [..])")
    present = [(lab, x) for lab, x in zip(value.labels, value.items) if not isinstance(x, Missing)]
    left_out = [lab for lab, x in zip(value.labels, value.items) if isinstance(x, Missing)]
    if not present:
        reasons = [r for x in value.items for r in x.reasons]
        return Missing(reasons)
    xs = [x for _, x in present]
    if name in ("count", "share", "all", "any") and not all(isinstance(x, bool) for x in xs):
        raise ClaimError(f"{name}() needs a comparison inside, e.g. {name}(cell(a, *) > cell(b, *))")
    result = {"count": lambda: float(sum(xs)), "share": lambda: sum(xs) / len(xs), "all": lambda: all(xs),
              "any": lambda: any(xs), "mean": lambda: statistics.fmean(xs), "min": lambda: min(xs),
              "max": lambda: max(xs)}[name]()
    hits = sum(xs) if name in ("count", "share", "all", "any") else None
    return Reduced(result, len(xs), len(value.items), left_out, hits)


class _Evaluator:
    def __init__(self, grid: Grid, mode: str, text: str):
        self.grid, self.mode, self.text = grid, mode, text
        self.reductions: list[Reduced] = []

    def ev(self, node: Node):
        kind = node.kind
        if kind == "num":
            return node.value
        if kind == "ref":
            return self.ref(node)
        if kind == "unary":
            return _map(lambda a: -a, _plain(self.ev(node.args[0])))
        if kind == "binary":
            a, b = (_plain(self.ev(x)) for x in node.args)
            return _map(_ARITH[node.value], a, b)
        if kind == "compare":
            a, b = (_plain(self.ev(x)) for x in node.args)
            return _map(_COMPARE[node.value], a, b)
        if kind == "not":
            return _map(lambda a: not a, _plain(self.ev(node.args[0])))
        if kind == "logic":
            a, b = (_plain(self.ev(x)) for x in node.args)
            op = (lambda x, y: x and y) if node.value == "and" else (lambda x, y: x or y)
            return _map(op, a, b)
        if kind == "call":
            value = _plain(self.ev(node.args[0]))
            if node.value == "abs":
                return _map(abs, value)
            reduced = _reduce(node.value, value)
            if isinstance(reduced, Reduced):
                self.reductions.append(reduced)
            return reduced
        raise ClaimError(f"unknown node {kind}")

    def ref(self, node: Node):
        grid = self.grid
        row, col = node.args[0], node.args[1]
        panel = None
        if len(node.args) == 3:
            try:
                panel = int(node.args[2])
            except (TypeError, ValueError):
                raise ClaimError(f"{self.text}: the panel must be a number, not {node.args[2]!r}") from None
        lookup = grid.paper if node.value == "paper" or self.mode == "paper" else grid.ours
        p_hint = panel if panel is not None else 0

        def expand(key, axis: str) -> list[str] | None:
            if key == "*":
                return (grid.rows if axis == "row" else grid.columns)[p_hint]
            return key if isinstance(key, list) else None

        rows, cols = expand(row, "row"), expand(col, "col")
        if rows is not None and cols is not None:
            raise ClaimError(f"{self.text}: only one of row and column may be * or a list")

        def one(r: str, c: str):
            p = grid.panel_of(r, c, panel, self.text)
            value, why = lookup(r, c, p)
            return value if value is not None else Missing([f"{r}/{c}: {why}"])

        if rows is not None:
            return Vec(list(rows), [one(r, col) for r in rows])
        if cols is not None:
            return Vec(list(cols), [one(row, c) for c in cols])
        return one(row, col)


def fmt_value(v) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, float):
        if not math.isfinite(v):
            return str(v)
        return f"{v:.3g}" if abs(v) < 100 else f"{v:.0f}"
    return str(v)


def _trace(node: Node, ev: _Evaluator) -> str:
    """The evaluated sides of the top-level comparison(s), e.g. ``4.1 <= 4.5``."""
    if node.kind == "logic":
        return f"{_trace(node.args[0], ev)}; {_trace(node.args[1], ev)}"
    if node.kind == "not":
        return "not (" + _trace(node.args[0], ev) + ")"
    if node.kind == "compare":
        sides = []
        for side in node.args:
            value = ev.ev(side)
            if isinstance(value, Reduced):
                text = fmt_value(value.value)
                if value.hits is not None:
                    text = f"{value.hits}/{value.used}" + (f" = {value.value:.2f}" if side.value == "share" else "")
                sides.append(text)
            elif isinstance(value, Missing | Vec):
                sides.append("—")
            else:
                sides.append(fmt_value(value))
        return f"{sides[0]} {node.value} {sides[1]}"
    value = ev.ev(node)
    if isinstance(value, Reduced) and value.hits is not None:  # all(...) / any(...)
        return f"{node.value} {value.hits}/{value.used}"
    return fmt_value(_plain(value)) if not isinstance(value, Missing | Vec) else "—"


@dataclass
class Outcome:
    verdict: str  # ✓, ✗ or "not measurable here"
    trace: str = ""  # the evaluated sides, e.g. "4.1 <= 4.5"
    why: str = ""  # the reason a check is not measurable, or the positions left out of a reduction


def evaluate(check: str | Node, grid: Grid, mode: str = "ours") -> Outcome:
    """The verdict of ``check`` on the table's cells: ``mode`` "ours" or "paper" (whose numbers fill ``cell``)."""
    node = parse(check) if isinstance(check, str) else check
    text = check if isinstance(check, str) else ""
    ev = _Evaluator(grid, mode, text)
    value = _plain(ev.ev(node))
    if isinstance(value, Missing):
        reasons = list(dict.fromkeys(value.reasons))
        shown = "; ".join(reasons[:4]) + (f"; … ({len(reasons)} cells)" if len(reasons) > 4 else "")
        return Outcome(NOT_MEASURABLE, why=shown)
    if isinstance(value, Vec):
        raise ClaimError(f"{text}: the check gives one value per key; reduce it with all(), share(), ...")
    if not isinstance(value, bool):
        raise ClaimError(f"{text}: the check must be a comparison, not a number")
    partial = [r for r in ev.reductions if r.left_out]
    why = "; ".join(f"on {r.used} of {r.total}: no number for {', '.join(r.left_out)}" for r in partial)
    return Outcome(PASS if value else FAIL, _trace(node, _Evaluator(grid, mode, text)), why)


@dataclass
class SoFar:
    """A claim about a mean over columns, checked on the columns that are measured so far (indicative only:
    the verdict stays "not measurable here" until every column has a number)."""

    label: str  # which columns, e.g. "SST-2, RTE, WSC, WiC (4 of 7 columns)"
    paper: Outcome
    ours: Outcome


@dataclass
class ClaimResult:
    text: str
    check: str
    source: str
    paper: Outcome
    ours: Outcome
    paper_fails: str = ""  # why the paper's own numbers contradict its text (the claim's `paper_fails`)
    so_far: SoFar | None = None  # a not-measurable claim checked on the columns measured so far


def check_claims(claims: list[dict], grid: Grid, so_far: tuple[str, Grid] | None = None) -> list[ClaimResult]:
    """Every claim's verdict on the paper's numbers and on ours (raises ClaimError for a malformed one).

    ``so_far`` is (label, grid) of the same table with each mean column taken over the columns measured so far
    (zoexp.report.so_far_grid): a claim not measurable on ``grid`` is also checked there, on both sides, and
    the result is kept beside its verdict, which does not change."""
    out = []
    for claim in claims or []:
        if not isinstance(claim, dict) or "text" not in claim or "check" not in claim:
            raise ClaimError(f"a claim needs `text` and `check`: {claim!r}")
        node = parse(claim["check"])
        unknown = set(claim) - {"text", "check", "source", "paper_fails"}
        if unknown:
            raise ClaimError(f"claim {claim['text']!r}: unknown keys {sorted(unknown)}")
        result = ClaimResult(str(claim["text"]), str(claim["check"]), str(claim.get("source") or ""),
                             evaluate(node, grid, "paper"), evaluate(node, grid, "ours"),
                             str(claim.get("paper_fails") or ""))
        if so_far is not None and result.ours.verdict == NOT_MEASURABLE:
            label, partial = so_far
            ours = evaluate(node, partial, "ours")
            if ours.verdict != NOT_MEASURABLE:
                result.so_far = SoFar(label, evaluate(node, partial, "paper"), ours)
        out.append(result)
    return out


def render_markdown(results: list[ClaimResult]) -> list[str]:
    """The Claims block under a table: claim, check, the paper's numbers, ours, verdict."""
    if not results:
        return []
    out = ["**Claims** (the paper's text about this table, checked on the paper's numbers and on ours; "
           "✗ is a result, not an error)", "",
           "| claim | check | paper | ours | verdict |", "|---|---|---|---|---|"]

    def cell_text(o: Outcome) -> str:
        if o.verdict == NOT_MEASURABLE:
            return "—"
        return f"{o.trace} {o.verdict}" + (f" ({o.why})" if o.why else "")

    for r in results:
        claim = r.text + (f" ({r.source})" if r.source else "")
        verdict = r.ours.verdict if r.ours.verdict != NOT_MEASURABLE else f"{NOT_MEASURABLE}: {r.ours.why}"
        if r.so_far is not None:
            verdict += (f". So far, on {r.so_far.label}: paper {cell_text(r.so_far.paper)}, ours "
                        f"{cell_text(r.so_far.ours)} (indicative only: the claim is about every column)")
        paper = cell_text(r.paper) + (f" — {r.paper_fails}" if r.paper_fails else "")
        row = [claim, f"`{r.check}`", paper, cell_text(r.ours), verdict]
        out.append("| " + " | ".join(x.replace("|", "\\|") for x in row) + " |")
    return out + [""]

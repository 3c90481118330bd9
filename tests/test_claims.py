"""The papers' claims under each table (zoexp.claims): the check language on synthetic cells (✓, ✗,
not measurable), nothing in it runs code, the Claims block the report renders, and every shipped claim
reads the cells it names and agrees with the paper's own numbers (or says why not)."""

from __future__ import annotations

import pytest
import yaml
from test_report import TOY, row, toy  # noqa: F401 -- the toy table fixture

import zoexp.report as report
from zoexp.claims import (
    FAIL,
    NOT_MEASURABLE,
    PASS,
    ClaimError,
    Grid,
    check_claims,
    evaluate,
    parse,
    render_markdown,
)
from zoexp.report import build, claims_grid, load_layout, table_claims, table_names

OURS = {("focus", "mem"): 1.0, ("hizoo", "mem"): 2.0, ("mezo", "mem"): 1.05, ("focus", "acc"): 70.0,
        ("hizoo", "acc"): 71.5, ("hzo", "a"): 60.0, ("hzo", "b"): 50.0, ("hzo", "c"): 40.0,
        ("mezo", "a"): 55.0, ("mezo", "b"): 45.0}
PAPER = {("focus", "mem"): 4.1, ("hizoo", "mem"): 7.5, ("focus", "acc"): 91.9, ("hizoo", "acc"): 91.7,
         ("hzo", "a"): 1.0, ("mezo", "a"): 2.0}


def grid(ours=None, paper=None) -> Grid:
    ours, paper = OURS if ours is None else ours, PAPER if paper is None else paper
    rows, cols = ["focus", "hizoo", "mezo", "hzo"], ["mem", "acc", "a", "b", "c"]

    def lookup(values):
        return lambda r, c, p: (values[(r, c)], "") if (r, c) in values else (None, "no run")

    return Grid([rows], [["a", "b", "c"]], [set(rows)], [set(cols)], lookup(ours), lookup(paper))


def test_a_comparison_passes_fails_or_is_not_measurable():
    g = grid()
    assert evaluate("cell(focus, mem) <= 0.6 * cell(hizoo, mem)", g).verdict == PASS
    out = evaluate("cell(focus, mem) <= 0.6 * cell(hizoo, mem)", g, "paper")
    assert out.verdict == PASS and out.trace == "4.1 <= 4.5"
    out = evaluate("abs(cell(focus, acc) - cell(hizoo, acc)) <= 1", g)
    assert out.verdict == FAIL and out.trace == "1.5 <= 1"
    out = evaluate("cell(focus, mem) < cell(mezo, mem)", g, "paper")
    assert out.verdict == NOT_MEASURABLE and out.why == "mezo/mem: no run"


def test_vectors_reduce_and_say_what_they_left_out():
    g = grid()
    out = evaluate("share(cell(hzo, *) > cell(mezo, *)) > 0.5", g)
    assert out.verdict == PASS and out.trace == "2/2 = 1.00 > 0.5" and out.why == "on 2 of 3: no number for c"
    assert evaluate("all(cell(hzo, [a, b]) > cell(mezo, [a, b]))", g).verdict == PASS
    assert evaluate("all(cell(hzo, [a, b]) > cell(mezo, [a, b]))", g, "paper").verdict == FAIL  # 1 < 2
    assert evaluate("count(cell(hzo, *) > 45) == 2", g).verdict == PASS
    assert evaluate("min(cell([focus, hizoo], mem)) >= 1 and not (max(cell([focus, hizoo], mem)) > 2)", g).verdict == PASS
    assert evaluate("mean(cell(*, a)) == 57.5 or cell(hzo, a) < 0", g).verdict == PASS
    assert evaluate("all(cell(focus, *) > 0)", g).verdict == NOT_MEASURABLE  # focus has no a/b/c


@pytest.mark.parametrize("check", [
    "__import__('os').system('true')", "cell(focus, mem)", "cell(focus, mem) <", "open(cell(a, b)) > 1",
    "cell(nope, mem) > 1", "cell(focus) > 1", "cell(*, *) > 1", "share(cell(hzo, a)) > 0",
    "cell(hzo, *) > cell(mezo, [a, b])", "cell(hzo, *) > 1", "1 ; 2", "cell(focus, mem) > 1 > 0",
])
def test_malformed_or_unsafe_checks_are_errors(check):
    with pytest.raises(ClaimError):
        evaluate(parse(check), grid(), "ours")


def test_keys_may_look_like_arithmetic():
    node = parse("cell(30b-hzo, opt-1.3b) - 1 > cell([r1-nu50, r2-nu1], sst2_acc, 1)")
    assert node.args[0].args[0].args == ["30b-hzo", "opt-1.3b"]
    assert node.args[1].args == [["r1-nu50", "r2-nu1"], "sst2_acc", "1"]


def test_the_report_renders_a_claims_block_under_the_table(toy, monkeypatch):  # noqa: F811
    claims = [{"text": "HiZOO needs more memory than MeZO", "source": "§1", "check": "cell(hizoo, mem) > cell(mezo, mem)"},
              {"text": "MeZO is at least as accurate as HiZOO on A", "check": "cell(mezo, a) >= cell(hizoo, a)"},
              {"text": "HiZOO beats MeZO on B", "check": "cell(hizoo, b) > cell(mezo, b)"}]
    monkeypatch.setattr(report, "table_claims", lambda name: claims)
    rows = [row(method="mezo", task="sst2", test=0.9, mem=2 * 2**30), row(method="hizoo", task="sst2", test=0.95,
                                                                          mem=3 * 2**30)]
    t = build("toy", "smoke", rows)
    verdicts = [(c.paper.verdict, c.ours.verdict) for c in t.claims]
    assert verdicts == [(PASS, PASS), (PASS, FAIL), (NOT_MEASURABLE, NOT_MEASURABLE)]
    md = report.to_markdown(t)
    block = md[md.index("**Claims**"):]
    assert md.index("**Claims**") > md.index("| ZO | MeZO |") and md.index("**Claims**") < md.index("A toy note.")
    assert "| HiZOO needs more memory than MeZO (§1) | `cell(hizoo, mem) > cell(mezo, mem)` | 7.5 > 4.4 ✓ " \
           "| 3 > 2 ✓ | ✓ |" in block
    assert "| 90 >= 95 ✗ | ✗ |" in block  # a ✗ is shown as it is
    assert "not measurable here: hizoo/b: ours is failed" not in block
    assert "| — | — | not measurable here: hizoo/b: the paper prints 'OOM'; mezo/b: the paper prints" not in block
    assert "not measurable here: hizoo/b: no run; mezo/b: no run |" in block


def test_a_failed_cell_makes_a_claim_not_measurable_with_the_reason(toy, monkeypatch):  # noqa: F811
    monkeypatch.setattr(report, "table_claims", lambda name: [{"text": "t", "check": "cell(hizoo, a) < cell(mezo, a)"}])
    rows = [row(method="mezo"), row(method="hizoo", status="failed", message="CUDA out of memory")]
    t = build("toy", "smoke", rows)
    assert t.claims[0].ours.verdict == NOT_MEASURABLE and t.claims[0].ours.why == "hizoo/a: ours is OOM"


def test_a_malformed_shipped_claim_is_a_report_error_naming_the_file(toy, monkeypatch):  # noqa: F811
    monkeypatch.setattr(report, "table_claims", lambda name: [{"text": "t", "check": "cell(nope, a) > 1"}])
    with pytest.raises(report.ReportError, match=r"conf/experiment/toy.yaml, sweep.claims: .*no cell \(nope, a\)"):
        build("toy", "smoke", [row()])


def test_a_claims_block_lists_every_claim_even_when_all_fail():
    results = check_claims([{"text": "x", "check": "cell(hzo, a) < cell(mezo, a)"}], grid())
    lines = render_markdown(results)
    assert lines[2] == "| claim | check | paper | ours | verdict |"
    assert lines[4] == "| x | `cell(hzo, a) < cell(mezo, a)` | 1 < 2 ✓ | 60 < 55 ✗ | ✗ |"


@pytest.mark.parametrize("name", table_names())
def test_every_shipped_claim_reads_its_cells_and_agrees_with_the_papers_numbers(name):
    claims = table_claims(name)
    assert claims, f"{name}: conf/experiment/{name}.yaml lists no claims"
    t = build(name, "cpu", [], check=False)  # no rows: every "ours" is not measurable, the paper's numbers are there
    results = check_claims(claims, claims_grid(t))
    for claim, result in zip(claims, results):
        assert result.ours.verdict == NOT_MEASURABLE and result.ours.why
        if claim.get("paper_fails"):
            assert result.paper.verdict == FAIL, f"{name}: {claim['text']}: paper_fails but the paper's numbers agree"
        else:
            assert result.paper.verdict != FAIL, f"{name}: {claim['text']}: the paper's numbers give {result.paper}"
    assert any(r.paper.verdict == PASS for r in results), f"{name}: no claim is checkable on the paper's numbers"
    assert load_layout(name)


def test_toy_layout_is_unchanged_by_claims():
    assert "claims" not in TOY


def test_a_claim_on_a_mean_column_is_also_checked_on_the_columns_measured_so_far(toy, monkeypatch):  # noqa: F811
    three = {**TOY, "columns": [{"key": "a", "label": "Task A", "select": {"task": "sst2"}},
                                {"key": "b", "label": "Task B", "select": {"task": "taskb"}},
                                {"key": "c", "label": "Task C", "select": {"task": "taskc"}},
                                {"key": "avg", "label": "Average", "aggregate": "mean"}],
             "paper": {"mezo": {"a": 90.0, "b": 60.0, "c": 30.0, "avg": 60.0},
                       "hizoo": {"a": 80.0, "b": 80.0, "c": 80.0, "avg": 80.0}}}
    (toy / "toy3.yaml").write_text(yaml.safe_dump(three, allow_unicode=True))
    monkeypatch.setattr(report, "table_claims", lambda name: [{"text": "HiZOO's average is above MeZO's",
                                                               "check": "cell(hizoo, avg) > cell(mezo, avg)"}])
    rows = [row(method=m, task=t, test=v) for m, t, v in
            (("mezo", "sst2", 0.5), ("mezo", "taskb", 0.7), ("hizoo", "sst2", 0.8), ("hizoo", "taskb", 0.6))]
    claim = build("toy3", "smoke", rows).claims[0]
    # the verdict is not changed by what is measured so far: the claim is about every column
    assert claim.ours.verdict == NOT_MEASURABLE and claim.paper.verdict == PASS
    assert claim.so_far.label == "Task A, Task B (2 of 3 columns in Average)"
    assert (claim.so_far.ours.verdict, claim.so_far.ours.trace) == (PASS, "70 > 60")  # (80+60)/2 vs (50+70)/2
    assert (claim.so_far.paper.verdict, claim.so_far.paper.trace) == (PASS, "80 > 75")  # the paper's, same columns
    line = [x for x in render_markdown([claim]) if x.startswith("| HiZOO")][0]
    assert line.endswith("| — | not measurable here: hizoo/avg: needs every column; mezo/avg: needs every column. "
                         "So far, on Task A, Task B (2 of 3 columns in Average): paper 80 > 75 ✓, ours 70 > 60 ✓ "
                         "(indicative only: the claim is about every column) |")
    # a column that one row lacks is left out of every row's mean; one column left is not "so far"
    assert build("toy3", "smoke", rows[:3]).claims[0].so_far is None
    # every column measured: the claim itself is checked (here ✗ where the first two columns gave ✓), nothing added
    rows += [row(method="mezo", task="taskc", test=0.9), row(method="hizoo", task="taskc", test=0.2)]
    claim = build("toy3", "smoke", rows).claims[0]
    assert claim.ours.verdict == FAIL and claim.ours.trace == "53.3 > 70" and claim.so_far is None

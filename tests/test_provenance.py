"""Rows as provenance: every row carries the code version of its method (zoexp.provenance), and the report
refuses to put rows of one method made by different code into one table (or keeps the newest on request)."""

from __future__ import annotations

import importlib
import json
import sys

import pytest
from omegaconf import OmegaConf
from test_report import cell, row, toy  # noqa: F401 -- the toy table fixture

import zoexp.report as report
from zoexp.methods import FOCUS, MeZO
from zoexp.provenance import code_version_of, method_code_version, method_modules
from zoexp.report import ReportError, build


def test_a_methods_code_is_its_class_its_bases_and_the_zo_core():
    assert method_modules(MeZO) == ["zoexp.methods.base", "zoexp.methods.deferred", "zoexp.methods.mezo",
                                    "zoexp.methods.noise", "zoexp.methods.philox"]
    assert {"zoexp.methods.hizoo", "zoexp.methods.selection"} <= set(method_modules(FOCUS))
    assert "zoexp.methods.mezo" not in method_modules(FOCUS)
    version = method_code_version(OmegaConf.create({"_target_": "zoexp.methods.MeZO"}))
    assert version == code_version_of(MeZO) and len(version) == 12 and int(version, 16) >= 0
    assert code_version_of(FOCUS) != version
    assert method_code_version(OmegaConf.create({"name": "zero-shot"})) is None


def test_the_version_follows_the_source(tmp_path, monkeypatch):
    (tmp_path / "mymethod.py").write_text("from zoexp.methods import Method\n\nclass Toy(Method):\n    pass\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    try:
        first = code_version_of(importlib.import_module("mymethod").Toy)
        (tmp_path / "mymethod.py").write_text("from zoexp.methods import Method\n\nclass Toy(Method):\n    x = 1\n")
        sys.modules.pop("mymethod")
        second = code_version_of(importlib.import_module("mymethod").Toy)
    finally:
        sys.modules.pop("mymethod", None)
    assert first != second


def versioned(version, started, **kw):
    return row(code_version=version, started_at=started, **kw)


def test_rows_of_one_method_from_different_code_are_refused(toy):  # noqa: F811
    rows = [versioned("aaaaaaaaaaaa", "2026-01-01T10:00:00", seed=0),
            versioned("bbbbbbbbbbbb", "2026-01-02T10:00:00", seed=1),
            versioned("cccccccccccc", "2026-01-01T10:00:00", method="hizoo")]
    with pytest.raises(ReportError) as err:
        build("toy", "smoke", rows)
    message = str(err.value)
    assert "refusing to build toy: rows of one method were made by different versions of its code" in message
    assert ("method mezo: bbbbbbbbbbbb (1 rows, latest 2026-01-02T10:00:00), aaaaaaaaaaaa (1 rows, latest "
            "2026-01-01T10:00:00)") in message
    assert "hizoo" not in message and "--newest-code" in message
    assert "zoexp -m experiment=toy profile=smoke method=mezo hydra.sweeper.skip_done=false" in message


def test_newest_code_keeps_each_methods_newest_version(toy):  # noqa: F811
    rows = [versioned("aaaaaaaaaaaa", "2026-01-01T10:00:00", seed=0, test=0.1),
            versioned("bbbbbbbbbbbb", "2026-01-02T10:00:00", seed=1, test=0.9),
            versioned(None, "2025-12-01T10:00:00", seed=2, test=0.5)]  # a row from before code versions
    kept = report.check_code_versions(rows, "toy", newest=True)
    assert [r["code_version"] for r in kept] == ["bbbbbbbbbbbb"]
    assert cell(build("toy", "smoke", kept), "mezo", "a").mean == pytest.approx(90.0)


def test_the_shipped_equivalences_name_real_methods():
    from zoexp import provenance
    from zoexp.paths import conf_dir

    provenance._canonical_versions.cache_clear()
    listed = {method for method, _ in provenance._canonical_versions()}
    assert "mezo" in listed
    # FOCUS's refactor moved bits (code_versions.yaml): its old version stays apart from the new ones
    assert provenance.canonical_code_version("focus", "162aff14a201") == "162aff14a201"
    assert provenance.canonical_code_version("focus", "0d1f12aaea9d") == "0d1f12aaea9d"
    assert provenance.canonical_code_version("mezo", "96d03851b8aa") == "50293393779f"
    assert all((conf_dir() / "method" / f"{m}.yaml").is_file() for m in listed)


def test_versions_listed_as_the_same_bits_count_as_one(toy, tmp_path, monkeypatch):  # noqa: F811
    """zoexp/code_versions.yaml: a refactor's before/after versions make one table; others still refuse."""
    from zoexp import provenance

    listing = tmp_path / "code_versions.yaml"
    listing.write_text("- commit: a refactor\n  evidence: fingerprints equal\n"
                       "  versions: {mezo: [aaaaaaaaaaaa, bbbbbbbbbbbb]}\n"
                       "- commit: another\n  versions: {mezo: [bbbbbbbbbbbb, dddddddddddd]}\n")
    monkeypatch.setattr(provenance, "EQUIVALENCES_FILE", listing)
    provenance._canonical_versions.cache_clear()
    try:
        assert provenance.canonical_code_version("mezo", "dddddddddddd") == "aaaaaaaaaaaa"
        assert provenance.canonical_code_version("hizoo", "dddddddddddd") == "dddddddddddd"
        rows = [versioned("aaaaaaaaaaaa", "2026-01-01T10:00:00", seed=0, test=0.1),
                versioned("dddddddddddd", "2026-01-02T10:00:00", seed=1, test=0.9)]
        assert cell(build("toy", "smoke", rows), "mezo", "a").mean == pytest.approx(50.0)
        with pytest.raises(ReportError, match="different versions"):
            build("toy", "smoke", rows + [versioned("cccccccccccc", "2026-01-03T10:00:00", seed=2)])
    finally:
        provenance._canonical_versions.cache_clear()


def test_the_cli_refuses_mixed_code_or_keeps_the_newest(toy, tmp_path, capsys):  # noqa: F811
    path = tmp_path / "rows.jsonl"
    rows = [versioned("aaaaaaaaaaaa", "2026-01-01T10:00:00", seed=0), versioned("bbbbbbbbbbbb", "2026-01-02T10:00:00", seed=1)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    args = ["toy", "--profile", "smoke", "--rows", str(path), "--out", str(tmp_path / "out"), "--no-figures"]
    assert report.main(args) == 2
    assert "method mezo: bbbbbbbbbbbb" in capsys.readouterr().err
    assert report.main([*args, "--newest-code"]) == 0
    assert (tmp_path / "out" / "tables" / "smoke" / "toy.md").is_file()


def test_a_hyperparameter_renamed_later_keeps_one_configuration():
    """code_versions.yaml's ``hparams``: LoHO's rows made before ``hybrid`` existed recorded ``implements``;
    read as the current config names them, they are the same configuration as rows made after."""
    from zoexp import provenance
    from zoexp.cells import config_key, describe_config

    provenance._hparam_changes.cache_clear()
    common = {"lr": 1e-6, "eps": 1e-2, "fo_layers": 1, "fo_lr": 1e-4}
    before = {"method": "loho", "seed": 0, "run": {"steps": 150}, "model": "m", "hparams": {
        **common, "implements": "inter-layer only: MeZO z on ZO layers + FO (Adam) on the deepest layers every step"}}
    after = {**before, "seed": 1, "hparams": {**common, "hybrid": "inter", "zo_ratio": 0.5}}
    intra = {**before, "hparams": {**common, "hybrid": "intra", "zo_ratio": 0.5}}
    assert config_key(before) == config_key(after) != config_key(intra)
    assert describe_config(before) == describe_config(after) and "implements" not in describe_config(before)
    other = {**before, "method": "mezo"}  # another method's hyperparameters are read as written
    assert provenance.current_hparams("mezo", other["hparams"]) == other["hparams"]

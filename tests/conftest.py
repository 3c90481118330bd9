"""Shared fixtures: benchmark data (real copies if present, else tiny fixtures), tiny models, config composition."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]

_SST2_FIXTURE = [
    ("a gripping , beautifully acted drama ", 1), ("the plot is a mess and the jokes fall flat ", 0),
    ("one of the most charming films of the year ", 1), ("tedious , overlong and utterly forgettable ", 0),
    ("a warm , funny and wise movie ", 1), ("i could not wait for it to end ", 0),
    ("the performances are terrific ", 1), ("a dull , lifeless exercise ", 0),
    ("smart , sharp and surprisingly moving ", 1), ("badly written and worse directed ", 0),
    ("an absolute delight ", 1), ("a waste of a talented cast ", 0),
]


def shared_data_dir() -> Path | None:
    env = os.environ.get("ZOEXP_DATA_DIR")
    if env and Path(env).is_dir():
        return Path(env)
    candidate = REPO.parent / "shared" / "data"
    return candidate if candidate.is_dir() else None


def write_sst2_fixture(root: Path, n_train: int = 48, n_val: int = 24) -> Path:
    folder = root / "sst2"
    folder.mkdir(parents=True, exist_ok=True)
    for split, n in (("train", n_train), ("validation", n_val)):
        with open(folder / f"{split}.jsonl", "w") as fh:
            for i in range(n):
                sentence, label = _SST2_FIXTURE[i % len(_SST2_FIXTURE)]
                fh.write(json.dumps({"idx": i, "sentence": sentence, "label": label}) + "\n")
    return root


@pytest.fixture(scope="session")
def data_dir(tmp_path_factory) -> Path:
    """Real benchmark data when available (ZOEXP_DATA_DIR or ../shared/data), else a small SST-2 fixture."""
    return shared_data_dir() or write_sst2_fixture(tmp_path_factory.mktemp("data"))


@pytest.fixture(scope="session")
def fixture_data_dir(tmp_path_factory) -> Path:
    """Always the small self-made SST-2 fixture (fast, independent of the environment)."""
    return write_sst2_fixture(tmp_path_factory.mktemp("fixture-data"))


def compose(overrides: list[str] | None = None, config_name: str = "config"):
    """Compose the zoexp config exactly as the CLI does (tasks registered, packaged conf dir)."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    from zoexp.configs import register_tasks
    from zoexp.paths import conf_dir

    register_tasks()
    with initialize_config_dir(config_dir=str(conf_dir()), version_base="1.3"):
        return hydra_compose(config_name=config_name, overrides=overrides or [])


@pytest.fixture(scope="session")
def tiny_opt():
    from omegaconf import OmegaConf

    from zoexp.models import load_model

    cfg = OmegaConf.load(REPO / "conf" / "model" / "tiny-opt.yaml")
    import torch

    torch.manual_seed(0)
    return load_model(cfg, "fp32", "cpu")


@pytest.fixture(scope="session")
def tiny_llama():
    from omegaconf import OmegaConf

    from zoexp.models import load_model

    cfg = OmegaConf.load(REPO / "conf" / "model" / "tiny-llama.yaml")
    import torch

    torch.manual_seed(0)
    return load_model(cfg, "fp32", "cpu")

"""The Hydra side of zoexp's config: its resolvers, the task specs as the ``task`` group, and the config
groups ``zoexp --help`` lists. Used by the command line and by anything that composes the config itself
(``zoexp.memory.compose``), so neither has to import the other.
"""

from __future__ import annotations

from hydra.core.config_store import ConfigStore
from omegaconf import OmegaConf

from zoexp.paths import conf_dir, tasks_dir


def register_resolvers() -> None:
    """``${zoexp.either:A,B}``: A unless it is null, else B. ``${zoexp.run_dir:ROOT,NAME,STAMP}``: ROOT/NAME
    when run.name is set, else ROOT/STAMP (zoexp.validate.run_dir; created exclusively before Hydra uses it,
    by zoexp.validate.PreRunChecks)."""
    from zoexp.validate import run_dir

    if not OmegaConf.has_resolver("zoexp.either"):
        OmegaConf.register_new_resolver("zoexp.either", lambda a, b: b if a is None else a)
    if not OmegaConf.has_resolver("zoexp.run_dir"):
        OmegaConf.register_new_resolver("zoexp.run_dir", run_dir)
    if not OmegaConf.has_resolver("zoexp.help_groups"):
        OmegaConf.register_new_resolver("zoexp.help_groups", help_groups)


def help_groups() -> str:
    """The config groups of ``zoexp --help``: the four a run chooses from, then the optional ones."""

    def options(folder) -> str:
        return ", ".join(sorted(p.stem for p in folder.glob("*.yaml")))

    conf = conf_dir()
    lines = ["Choose one of each (GROUP=OPTION):", ""]
    for group in ("model", "task", "method", "run"):
        lines.append(f"{group}: {options(tasks_dir() if group == 'task' else conf / group)}")
    lines += ["", "Optional, with -m (a sweep):", "",
              f"experiment: {options(conf / 'experiment')}   (a paper table: -m experiment=NAME profile=cpu)",
              f"hydra/launcher: {options(conf / 'hydra' / 'launcher')}   (where the sweep's jobs run)"]
    return "\n".join(lines)


def register_tasks() -> None:
    """Task specs live in tasks/*.yaml (data, shipped with the package); expose them as the `task` group."""
    store = ConfigStore.instance()
    for path in sorted(tasks_dir().glob("*.yaml")):
        store.store(group="task", name=path.stem, node=OmegaConf.load(path), provider="zoexp")

"""`zoexp` command line: compose the Hydra config, call ``zoexp.runner.run``, print a summary."""

from __future__ import annotations

import logging
import os
import sys

import hydra
from omegaconf import DictConfig

from zoexp.configs import register_resolvers, register_tasks
from zoexp.paths import conf_dir
from zoexp.validate import EXIT_DIVERGED, EXIT_FAILED, EXIT_OK, EXIT_USER_ERROR

log = logging.getLogger("zoexp")



def _user_errors() -> tuple[type[BaseException], ...]:
    from zoexp.loggers import LoggerError
    from zoexp.models import ModelLoadError
    from zoexp.resume import ResumeError
    from zoexp.tasks import DataError
    from zoexp.validate import ConfigError, UserError

    return (ModelLoadError, DataError, ResumeError, ConfigError, UserError, LoggerError)


# exit code of each job of a multirun run in this process (zoexp.validate: EXIT_*); main() exits with the worst
_OUTCOMES: list[int] = []
_SEVERITY = {EXIT_OK: 0, EXIT_DIVERGED: 1, EXIT_USER_ERROR: 2, EXIT_FAILED: 3}


def _fmt_bytes(n) -> str:
    if n is None:
        return "—"
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{n} B"
        n /= 1024
    return str(n)


def print_summary(row: dict) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"{row['method']} · {row['model']} · {row['task']} (seed {row['seed']})", show_header=False)
    table.add_column(style="bold")
    table.add_column()
    for key, value in row.items():
        if key.startswith("test/") and key != "test/n":
            table.add_row(f"test {key[5:]}", f"{value:.4f} (n={row.get('test/n')})")
    for key, value in row.items():  # run.test_final: the weights after the last step
        if key.startswith("test_final/") and key != "test_final/step" and value is not None:
            table.add_row(f"test {key[11:]}, final weights", f"{value:.4f} (step {row.get('test_final/step')})")
    for key, value in row.items():
        if key.startswith("dev/") and value is not None:
            table.add_row(f"best dev {key[4:]}", f"{value:.4f} (step {row.get('best_step')})")
    if row.get("steps"):
        table.add_row("steps", f"{row['steps']} ({row.get('train/time_per_step_s', 0):.2f} s/step, "
                               f"final loss {row.get('train/final_loss') or float('nan'):.4f})")
    table.add_row("wall-clock", " · ".join(
        f"{k[5:-2]} {row[k]:.1f} s" for k in ("time/load_s", "time/train_s", "time/eval_s", "time/total_s") if k in row))
    table.add_row("peak host RSS", " · ".join(
        f"{k[4:].split('_rss')[0]} {_fmt_bytes(row[k])}" for k in row if k.endswith("_rss_peak_bytes")))
    gpu = [k for k in row if "_gpu_allocated_peak_bytes" in k]
    if gpu:
        table.add_row("peak GPU allocated", " · ".join(f"{k[4:].split('_gpu')[0]} {_fmt_bytes(row[k])}" for k in gpu))
    table.add_row("optimizer state", _fmt_bytes(row.get("optimizer_state_bytes")))
    if row.get("optimizer_grad_bytes_max"):
        table.add_row("gradients (peak)", _fmt_bytes(row["optimizer_grad_bytes_max"]))
    table.add_row("status", row["status"] + (f": {row['message']}" if row.get("message") else ""))
    table.add_row("row", f"{row.get('results_file', '')}")
    Console().print(table)


register_tasks()
register_resolvers()


@hydra.main(version_base="1.3", config_path=str(conf_dir()), config_name="config")
def _main(cfg: DictConfig):
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    from zoexp.resume import Preempted
    from zoexp.runner import run

    hydra_cfg = HydraConfig.get()
    multirun = hydra_cfg.mode == RunMode.MULTIRUN
    if cfg.get("sweep") is not None and not multirun:  # an experiment is a table's sweep, not one run
        print(f"zoexp: error: experiment={cfg.experiment_name} is a paper table's sweep; run it with -m: "
              f"zoexp -m experiment={cfg.experiment_name} profile={cfg.get('profile')}", file=sys.stderr)
        sys.exit(2)
    logging.getLogger("zoexp").setLevel(logging.INFO)
    try:
        row = run(cfg, run_dir=hydra_cfg.runtime.output_dir)
    except _user_errors() as exc:  # the run never started: no row, one line, exit code 2
        print(f"zoexp: error: {exc}", file=sys.stderr)
        if multirun:
            _OUTCOMES.append(EXIT_USER_ERROR)
            return None
        sys.exit(EXIT_USER_ERROR)
    except Preempted as exc:  # checkpoint and `preempted` row written; stop (a sweep too: the machine is going)
        print(f"zoexp: preempted: {exc}", file=sys.stderr)
        sys.exit(128 + int(exc.signum or 15))
    except Exception:
        if multirun:  # the row says `failed`; the rest of the sweep goes on
            log.exception("run failed (row written with status=failed); continuing the sweep")
            _OUTCOMES.append(EXIT_FAILED)
            return None
        raise  # Hydra prints the traceback and exits with code 1 (EXIT_FAILED)
    row["results_file"] = cfg.run.results_file
    if not row.get("dist/rank"):  # rank 0 (or a single process) prints
        print_summary(row)
    code = EXIT_DIVERGED if row.get("status") == "diverged" else EXIT_OK
    if multirun:
        _OUTCOMES.append(code)
    elif code != EXIT_OK:
        print(f"zoexp: run diverged: {row.get('message')} (exit code {code})", file=sys.stderr)
        sys.exit(code)
    return row.get(f"test/{cfg.task.get('metric', 'acc')}")


def _quiet_other_ranks() -> None:
    """Under torchrun, ranks other than 0 write no Hydra output directory of their own (they use rank 0's,
    see zoexp.distributed) and log to stdout only."""
    if int(os.environ.get("RANK", "0")) > 0 and int(os.environ.get("WORLD_SIZE", "1")) > 1:
        args = sys.argv[1:]
        extra = ["hydra.output_subdir=null"]
        if not any(a.startswith("hydra/job_logging=") for a in args):
            extra.append("hydra/job_logging=stdout")
        sys.argv += [a for a in extra if a not in args]


def main() -> None:
    from zoexp.distributed import shutdown

    _quiet_other_ranks()
    try:
        _main()
    except BaseException:  # a data-parallel multirun's process group, before the interpreter shuts down
        shutdown(barrier=False)
        raise
    shutdown(barrier=True)  # (a no-op after a single run, whose group ended with it)
    # a multirun ran every job (a failed one does not stop the sweep); its exit code is the worst job's
    worst = max(_OUTCOMES, key=_SEVERITY.__getitem__, default=EXIT_OK)
    if worst != EXIT_OK:
        print(f"zoexp: {sum(c != EXIT_OK for c in _OUTCOMES)} of {len(_OUTCOMES)} runs did not finish ok "
              f"(exit code {worst}; see their rows and messages above)", file=sys.stderr)
        sys.exit(worst)


if __name__ == "__main__":
    main()

"""Where zoexp finds its configs, task specs, data and caches.

`conf/` and `tasks/` sit at the top level of the repository and are copied into the wheel as
`zoexp/conf` and `zoexp/tasks`; an installed zoexp reads the copies, a source checkout (or an
editable install) reads the originals.
"""

from __future__ import annotations

import os
from pathlib import Path

_PKG = Path(__file__).resolve().parent


def _resource_dir(name: str) -> Path:
    for candidate in (_PKG / name, _PKG.parent / name):
        if candidate.is_dir():
            return candidate
    raise FileNotFoundError(f"zoexp cannot find its {name}/ directory next to {_PKG}; reinstall the package")


def conf_dir() -> Path:
    return _resource_dir("conf")


def tasks_dir() -> Path:
    return _resource_dir("tasks")


def cache_dir() -> Path:
    """Converted checkpoints and tokenizers; `ZOEXP_CACHE_DIR` overrides ~/.cache/zoexp."""
    root = os.environ.get("ZOEXP_CACHE_DIR") or os.path.join(
        os.environ.get("XDG_CACHE_HOME", os.path.expanduser("~/.cache")), "zoexp"
    )
    return Path(root)

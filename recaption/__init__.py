"""recaption: turn web image shards into a densely recaptioned training corpus.

    import recaption
    summary = recaption.run("default", {"input.path": "shards/", "output.path": "corpus/"})

`run`, `load_config`, `RunSummary` and `corpus_status` are imported on first use, so that
`import recaption` (and the command line) does not load Ray.
"""

from __future__ import annotations

from importlib import metadata
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from recaption.api import bundled_pipelines, run
    from recaption.config import PipelineConfig, load_config
    from recaption.progress import ProgressStyle, RunSummary
    from recaption.status import corpus_status

try:
    __version__ = metadata.version("recaption")
except metadata.PackageNotFoundError:  # run from a checkout that was never installed
    __version__ = "0+unknown"

_LAZY = {
    "run": "recaption.api",
    "bundled_pipelines": "recaption.api",
    "load_config": "recaption.config",
    "PipelineConfig": "recaption.config",
    "RunSummary": "recaption.progress",
    "ProgressStyle": "recaption.progress",
    "corpus_status": "recaption.status",
}
__all__ = [
    "PipelineConfig",
    "ProgressStyle",
    "RunSummary",
    "__version__",
    "bundled_pipelines",
    "corpus_status",
    "load_config",
    "run",
]


def __getattr__(name: str) -> Any:
    if name not in _LAZY:
        raise AttributeError(f"module 'recaption' has no attribute {name!r}")
    import importlib

    return getattr(importlib.import_module(_LAZY[name]), name)

"""The Python API, for notebooks and other orchestrators (Airflow, Prefect, a Ray job of your
own). `recaption run` on the command line is `recaption.run` here.

    import recaption

    summary = recaption.run("default", {"input.path": "shards/", "output.path": "corpus/"})
    print(summary.totals.captioned, summary.failed)

The pipelines shipped in the package (`recaption/pipelines/*.yaml`, the repository's
`pipelines/` folder) are found by name wherever the package is installed.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping, Sequence
from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING, Any

from recaption.config import PipelineConfig, load_config, with_overrides

if TYPE_CHECKING:
    from recaption.progress import ProgressStyle, RunSummary

__all__ = ["bundled_pipelines", "describe_pipeline", "load_config", "run"]


def bundled_pipelines() -> dict[str, Path]:
    """Name -> file of each pipeline shipped in the package, sorted by name."""
    folder = resources.files("recaption") / "pipelines"
    if not folder.is_dir():
        return {}
    found = (Path(str(f)) for f in folder.iterdir() if f.name.endswith(".yaml"))
    return {p.stem: p for p in sorted(found, key=lambda p: p.stem)}


def describe_pipeline(path: Path) -> str:
    """A pipeline file's first sentence, from the comment it opens with: what it is for."""
    words = []
    for line in path.read_text().splitlines():
        if not line.startswith("#") or line.startswith("#  "):  # the end, or an example
            break
        words.append(line.lstrip("#").strip())
    text = " ".join(words)
    return text.split(". ", 1)[0].rstrip(".:, ")


def _assignments(overrides: Sequence[str] | Mapping[str, Any]) -> list[str]:
    """`--set` assignments from a list of them or from {"key.path": value}; a mapping's
    values are written as JSON (valid YAML), so a string stays the string it was."""
    if isinstance(overrides, Mapping):
        return [
            f"{key}={json.dumps(str(v) if isinstance(v, Path) else v)}"
            for key, v in overrides.items()
        ]
    if isinstance(overrides, str):
        return [overrides]
    return list(overrides)


def config(
    config_or_path: PipelineConfig | str | Path,
    overrides: Sequence[str] | Mapping[str, Any] = (),
) -> PipelineConfig:
    """A pipeline config from a bundled name, a file or a config, with overrides applied."""
    sets = _assignments(overrides)
    if isinstance(config_or_path, PipelineConfig):
        return with_overrides(PipelineConfig, config_or_path.model_dump(), sets)
    return load_config(config_or_path, sets)


def run(
    config_or_path: PipelineConfig | str | Path,
    overrides: Sequence[str] | Mapping[str, Any] = (),
    *,
    progress: bool | str | ProgressStyle = True,
    progress_every: float = 30.0,
    retry_rejected: bool | str | Iterable[str] | None = None,
) -> RunSummary:
    """Caption `input.path` into the corpus at `output.path`, as `recaption run` does.

    `config_or_path`: a bundled pipeline's name ("default", "openai", ...), a YAML file or a
    PipelineConfig; `overrides`: `--set` assignments, as ["ray.workers=4"] or
    {"ray.workers": 4}. `progress`: True (a bar on a terminal, else a line every
    `progress_every` seconds), False, "bar", "lines" or "off". `retry_rejected`: ask again
    committed rejections with these reasons (True: those time heals). Raises `UserError`
    (a one-line message) for what the user must fix; a shard that failed is in
    `summary.failed`. Ray: an initialised Ray is used as it is; else `ray.address`, else a
    local one for the run.
    """
    from recaption.pipeline import retry_reasons
    from recaption.pipeline import run as run_pipeline
    from recaption.progress import ProgressStyle

    cfg = config(config_or_path, overrides)
    retry = None
    if retry_rejected is True:
        retry = retry_reasons(None)
    elif isinstance(retry_rejected, str):
        retry = retry_reasons(retry_rejected)
    elif retry_rejected:
        retry = retry_reasons(",".join(retry_rejected))
    style = ProgressStyle.of(progress, progress_every)
    return run_pipeline(cfg, show_progress=style, retry_rejected=retry)

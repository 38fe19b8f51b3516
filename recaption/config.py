"""PipelineConfig: one YAML file per pipeline (pipelines/*.yaml), `--set a.b=value` overrides.

Secrets never live here: API keys come from the environment only. Unknown keys are errors,
so a typo in a pipeline file or a `--set` fails loudly instead of being ignored.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal
from urllib.parse import urlsplit, urlunsplit

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError


class ConfigError(Exception):
    """A bad pipeline file or override; the message is one line meant for the user."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class InputConfig(_Strict):
    path: str = "data/shards"
    format: Literal["auto", "webdataset", "parquet"] = "auto"


class OutputConfig(_Strict):
    path: str = "data/corpus"
    store_images: bool = True
    row_group_size: int = Field(
        256, ge=1, description="rows buffered before a Parquet row group is flushed"
    )


class ImageConfig(_Strict):
    max_side: int = Field(512, ge=16, description="longest side of the prepared image, pixels")
    format: Literal["jpeg", "webp", "png"] = "jpeg"
    quality: int = Field(90, ge=1, le=100)
    max_pixels: int = Field(
        100_000_000, ge=1, description="decompression-bomb guard on the header size"
    )


class CaptionerConfig(_Strict):
    backend: Literal["analyzer"] = "analyzer"  # more backends join this list as they land
    model: str | None = None  # None: the backend's default
    base_url: str | None = None
    image: ImageConfig = ImageConfig()
    # analyzer: OCR runs only where text is likely ("auto"), everywhere, or never
    ocr: Literal["auto", "always", "never"] = "auto"
    faces: bool = True


class ValidationConfig(_Strict):
    min_words: int = 40
    max_words: int = 250
    short_max_words: int = 50
    language: str | None = "en"  # None disables the language check
    max_repeated_ngram_share: float = Field(0.35, gt=0, le=1)


class LimitsConfig(_Strict):
    rpm: int | None = None
    tpm: int | None = None
    concurrency: int = Field(8, ge=1, description="requests in flight per worker")


class RayConfig(_Strict):
    address: str | None = None  # None: start a local Ray; "auto" or host:port joins a cluster
    workers: int = Field(2, ge=1)
    cpus_per_worker: float = Field(1.0, gt=0)


class PipelineConfig(_Strict):
    name: str = "default"
    input: InputConfig = InputConfig()
    output: OutputConfig = OutputConfig()
    captioner: CaptionerConfig = CaptionerConfig()
    validation: ValidationConfig = ValidationConfig()
    limits: LimitsConfig = LimitsConfig()
    ray: RayConfig = RayConfig()


def _apply_override(tree: dict[str, Any], assignment: str) -> None:
    if "=" not in assignment:
        raise ConfigError(f"--set expects key.path=value, got {assignment!r}")
    dotted, raw = assignment.split("=", 1)
    parts = dotted.strip().split(".")
    node = tree
    for part in parts[:-1]:
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ConfigError(f"--set {dotted}: {part!r} is not a section")
        node = child
    # YAML parsing gives `--set ray.workers=4` an int and `--set captioner.base_url=null` a None.
    node[parts[-1]] = yaml.safe_load(raw) if raw.strip() else ""


def _first_error(exc: ValidationError) -> str:
    err = exc.errors()[0]
    where = ".".join(str(p) for p in err["loc"])
    if err["type"] == "extra_forbidden":
        return f"unknown config key {where!r}"
    return f"config key {where!r}: {err['msg']}"


def load_config(path: str | Path | None, overrides: list[str] = ()) -> PipelineConfig:
    tree: dict[str, Any] = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"pipeline file not found: {path}")
        try:
            tree = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as exc:
            raise ConfigError(
                f"pipeline file {path} is not valid YAML: {exc}".replace("\n", " ")
            ) from None
        if not isinstance(tree, dict):
            raise ConfigError(f"pipeline file {path} must hold a mapping of sections")
    for assignment in overrides:
        _apply_override(tree, assignment)
    try:
        return PipelineConfig.model_validate(tree)
    except ValidationError as exc:
        raise ConfigError(_first_error(exc)) from None


_SECRET_WORDS = ("key", "secret", "token", "password")


def redacted(config: PipelineConfig) -> dict[str, Any]:
    """The config as written to the manifest: secret-looking values and URL credentials removed."""

    def clean(node: Any, name: str = "") -> Any:
        if isinstance(node, dict):
            return {k: clean(v, k) for k, v in node.items()}
        if isinstance(node, list):
            return [clean(v) for v in node]
        if isinstance(node, str):
            if any(word in name.lower() for word in _SECRET_WORDS):
                return "***"
            parts = urlsplit(node)
            if parts.scheme and parts.password:
                return urlunsplit(
                    parts._replace(netloc=parts.hostname + (f":{parts.port}" if parts.port else ""))
                )
        return node

    return clean(config.model_dump(mode="json"))

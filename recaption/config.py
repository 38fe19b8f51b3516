"""PipelineConfig: one YAML file per pipeline (pipelines/*.yaml), `--set a.b=value` overrides.

Secrets never live here: API keys come from the environment only. Unknown keys are errors,
so a typo in a pipeline file or a `--set` fails loudly instead of being ignored.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, ClassVar, Literal, TypeVar
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from recaption.errors import ConfigError

M = TypeVar("M", bound=BaseModel)


class Strict(BaseModel):
    """A config section: unknown keys are errors."""

    model_config = ConfigDict(extra="forbid")


class InputConfig(Strict):
    path: str = "data/shards"
    # auto: img2dataset output (webdataset tars, parquet, files folders), else a plain
    # folder of images at any depth (with optional <name>.txt alt text)
    format: Literal["auto", "webdataset", "parquet", "files", "folder"] = "auto"
    # parquet tables (e.g. Hugging Face datasets): column names; null: the usual names
    image_col: str | None = None
    caption_col: str | None = None
    key_col: str | None = None
    url_col: str | None = None
    images_per_shard: int = Field(10_000, ge=1, description="folder: images per shard")
    # a trial run before paying for the whole input: the corpus holds the selection only
    shards: str | int | None = Field(None, description='shard positions: "0-9", "0,3,7-8", 4')
    limit: int | None = Field(None, ge=1, description="the first N samples, in shard order")
    fraction: float | None = Field(None, gt=0, le=1, description="this share of each shard's keys")


class OutputConfig(Strict):
    path: str = "data/corpus"  # a folder, or a URI (s3://bucket/corpus, gs://...)
    # a corpus in object storage is written through this local folder (resume state, files
    # being written); None: ~/.cache/recaption/staging/<hash of path>
    staging: str | None = None
    store_images: bool = True
    row_group_size: int = Field(
        256, ge=1, description="rows buffered before a Parquet row group is flushed"
    )
    # a corpus holds one captioner's output; true lets a re-run add another model or prompt
    allow_config_change: bool = False
    # every answered key is journaled so an interrupted shard repeats no call; false redoes
    # such a shard whole (only sensible for a free captioner)
    journal: bool = True


class ImageConfig(Strict):
    max_side: int = Field(512, ge=16, description="longest side of the prepared image, pixels")
    format: Literal["jpeg", "webp", "png"] = "jpeg"
    quality: int = Field(90, ge=1, le=100)
    max_pixels: int = Field(
        100_000_000, ge=1, description="decompression-bomb guard on the header size"
    )
    # auto: an input that already conforms (format, RGB, size, bytes, upright) is sent as it
    # came, undecoded; always: every image is decoded and re-encoded
    reencode: Literal["auto", "always"] = "auto"
    max_bytes: int = Field(
        1_500_000, ge=1, description="inputs larger than this are re-encoded, whatever else"
    )
    # threads per worker that read and prepare images (Pillow releases the GIL while it
    # decodes, resizes and encodes), beside the event loop that sends requests
    threads: int = Field(2, ge=1, le=64)
    # openai: the vision `detail` sent with the image; "low" is 85 tokens at any size
    detail: Literal["low", "high", "auto"] = "high"


class EndpointConfig(Strict):
    """One deployment of an endpoint pool, with its own credentials and quota."""

    name: str
    api: Literal["openai", "azure"] = "openai"
    base_url: str | None = None  # azure: the resource endpoint, https://NAME.openai.azure.com
    api_key_env: str | None = None  # None: OPENAI_API_KEY, or AZURE_OPENAI_API_KEY for azure
    api_version: str | None = None  # azure; None: $OPENAI_API_VERSION
    model: str | None = None  # the model (azure: deployment) name sent; None: captioner.model
    rpm: int | None = Field(None, ge=1)
    tpm: int | None = Field(None, ge=1)
    # a self-hosted server (vLLM, SGLang): requests in flight to it from each worker, so its
    # batch stays full without queueing; None: no cap beyond limits.concurrency
    max_in_flight: int | None = Field(None, ge=1)  # requests in flight, all workers together


class PriceConfig(Strict):
    input_per_mtok: float = Field(ge=0)
    output_per_mtok: float = Field(ge=0)


class BatchConfig(Strict):
    """openai-batch: how requests are grouped into batches and what happens to the misses."""

    # the API's limits per batch file: 50,000 requests and 200 MB (kept under, with margin)
    max_requests: int = Field(50_000, ge=1, le=50_000)
    max_bytes: int = Field(190_000_000, ge=1_000, le=200_000_000)
    completion_window: Literal["24h"] = "24h"
    poll_s: float = Field(30.0, gt=0, description="first wait between status checks")
    poll_max_s: float = Field(600.0, gt=0, description="the wait grows to this")
    # false: submit what is due, collect what is done, and return; run again to go on
    wait: bool = True
    # where a request that failed, expired or went missing is tried again
    retry: Literal["batch", "online"] = "batch"
    shards_per_worker: int = Field(16, ge=1, description="shards a worker keeps in batches")
    # the organisation's enqueued-token quota for the model (all batches validating, in
    # progress or finalizing count): the run keeps its live batches under it. None: learnt
    # from the batches the API refuses for it (token_limit_exceeded)
    max_enqueued_tokens: int | None = Field(None, ge=1)
    # delete a batch's input, output and error files once its shard is committed
    cleanup: bool = True


class CaptionerConfig(Strict):
    backend: Literal["analyzer", "openai", "openai-batch", "transformers"] = "analyzer"
    model: str | None = None  # None: the backend's default
    base_url: str | None = None  # None: $OPENAI_BASE_URL, else api.openai.com
    image: ImageConfig = ImageConfig()
    # analyzer: OCR runs only where text is likely ("auto"), everywhere, or never
    ocr: Literal["auto", "always", "never"] = "auto"
    faces: bool = True
    # openai: where to send requests. Without `endpoints`, one endpoint made of `api`,
    # `base_url`, `api_version` and limits.rpm/tpm.
    api: Literal["openai", "azure"] = "openai"
    api_version: str | None = None
    endpoints: list[EndpointConfig] = []
    max_in_flight: int | None = Field(None, ge=1)  # of the endpoint made of the keys above
    prompt: str = "dense-v1"  # a bundled prompt (recaption/prompts/NAME.md) or a file path
    # auto: JSON-schema structured output, falling back to JSON mode, then to plain text
    response_format: Literal["auto", "json_schema", "json_object", "text"] = "auto"
    max_output_tokens: int = Field(600, ge=16)
    temperature: float | None = Field(None, ge=0, le=2)  # None: the server's default
    timeout_s: float = Field(90, gt=0)
    max_attempts: int = Field(6, ge=1, description="HTTP attempts per image, retries included")
    refusal_retries: int = Field(2, ge=0)
    price: PriceConfig | None = None  # None: the list price of `model` (pricing.PRICES)
    batch: BatchConfig = BatchConfig()  # openai-batch only
    # transformers: a VLM saved in a local directory (never fetched from a hub)
    model_path: str | None = None
    device: Literal["auto", "cpu", "cuda"] = "auto"  # auto: cuda when there is one
    batch_size: int | None = Field(None, ge=1, description="None: by free GPU memory; 4 on CPU")
    batch_wait_ms: float = Field(20, ge=0, description="how long a batch waits to fill")
    repetition_penalty: float = Field(1.05, ge=1.0)


class ValidationConfig(Strict):
    min_words: int = 40
    max_words: int = 250
    short_max_words: int = 50
    language: str | None = "en"  # None disables the language check
    max_repeated_ngram_share: float = Field(0.35, gt=0, le=1)


class LimitsConfig(Strict):
    # per endpoint, for the whole run; None: learnt from the x-ratelimit-limit-* headers
    rpm: int | None = Field(None, ge=1)
    tpm: int | None = Field(None, ge=1)
    concurrency: int = Field(8, ge=1, description="requests in flight per worker")
    # the most quota sent at once, in seconds of it: a server may enforce a per-minute quota
    # over windows this short. None: learnt, from 0.25 s down to 0.05 s as 429s say
    burst_s: float | None = Field(None, ge=0.01, le=60)
    # the most the corpus may cost, in US dollars (committed shards, journaled answers and
    # this run's requests); at the cap the run stops admitting paid requests and exits with
    # status 3, every shard committed or resumable. None: no cap
    max_usd: float | None = Field(None, ge=0)


class NearConfig(Strict):
    enabled: bool = True
    # bits by which both perceptual hashes (phash, dhash) may differ: measured on the bundled
    # photos, copies resized, re-encoded or cropped a few pixels are <= 8 apart, distinct
    # photos >= 16
    max_distance: int = Field(10, ge=0, le=24)


class DedupConfig(Strict):
    """Images already captioned in this run (or in `against`) are not sent again."""

    # reuse: a data/ row with the first occurrence's caption, at no cost; reject: a rejected/
    # row (duplicate_image); off: every image is captioned
    mode: Literal["reuse", "reject", "off"] = "reuse"
    near: NearConfig = NearConfig()
    # earlier corpora whose captions are reused: same model, prompt version and settings
    against: list[str] = []
    # index actors; more spread its memory over nodes
    partitions: int = Field(1, ge=1, le=256)
    # how long a duplicate waits for its first occurrence's caption before it is asked itself
    wait_s: float = Field(900, gt=0)

    @field_validator("mode", mode="before")
    @classmethod
    def _yaml_off(cls, value: object) -> object:
        return "off" if value is False else value  # YAML reads a bare `off` as false


class RayConfig(Strict):
    address: str | None = None  # None: start a local Ray; "auto" or host:port joins a cluster
    workers: int = Field(2, ge=1)
    cpus_per_worker: float = Field(1.0, gt=0)
    gpus_per_worker: float = Field(0, ge=0, description="1: one worker (and model) per GPU")


class PipelineConfig(Strict):
    name: str = "default"
    input: InputConfig = InputConfig()
    output: OutputConfig = OutputConfig()
    captioner: CaptionerConfig = CaptionerConfig()
    validation: ValidationConfig = ValidationConfig()
    limits: LimitsConfig = LimitsConfig()
    dedup: DedupConfig = DedupConfig()
    ray: RayConfig = RayConfig()


class _Loader(yaml.SafeLoader):
    """YAML without dates: `api_version: 2024-10-21` stays the string Azure expects."""

    yaml_implicit_resolvers: ClassVar[dict] = {
        first: [r for r in resolvers if r[0] != "tag:yaml.org,2002:timestamp"]
        for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
    }


def _apply_override(tree: dict[str, Any], assignment: str) -> None:
    if "=" not in assignment:
        raise ConfigError(f"--set expects key.path=value, got {assignment!r}")
    dotted, raw = assignment.split("=", 1)
    parts = dotted.strip().split(".")
    node: Any = tree
    for part in parts[:-1]:
        if isinstance(node, list):  # `captioner.endpoints.0.rpm=500`
            node = node[_index(node, part, dotted)]
            continue
        child = node.setdefault(part, {})
        if not isinstance(child, dict | list):
            raise ConfigError(f"--set {dotted}: {part!r} is not a section")
        node = child
    # YAML parsing gives `--set ray.workers=4` an int and `--set captioner.base_url=null` a None.
    try:
        value = yaml.load(raw, Loader=_Loader) if raw.strip() else ""
    except yaml.YAMLError as exc:
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise ConfigError(
            f"--set {dotted}: {raw!r} is not a YAML value ({problem}); quote it: '{dotted}=\"...\"'"
        ) from None
    if isinstance(node, list):
        node[_index(node, parts[-1], dotted)] = value
    else:
        node[parts[-1]] = value


def _index(items: list, part: str, dotted: str) -> int:
    if not part.isdigit() or int(part) >= len(items):
        raise ConfigError(f"--set {dotted}: {part!r} is not an index of a {len(items)}-item list")
    return int(part)


def _first_error(exc: ValidationError) -> str:
    err = exc.errors()[0]
    where = ".".join(str(p) for p in err["loc"])
    if err["type"] == "extra_forbidden":
        return f"unknown config key {where!r}"
    return f"config key {where!r}: {err['msg']}"


def load_config(path: str | Path | None, overrides: list[str] = ()) -> PipelineConfig:
    """`path`: a pipeline file, or the name of one bundled with the package (a name without
    `/` or `.yaml`: default, openai, openai-batch, azure, vllm, local-vlm)."""
    tree: dict[str, Any] = {}
    if path is not None:
        from recaption.api import bundled_pipelines  # the package data, wherever installed

        bundled = bundled_pipelines()
        name = str(path)
        bare = "/" not in name and not name.endswith((".yaml", ".yml"))
        path = bundled[name] if bare and name in bundled else Path(path)
        if not path.is_file():
            known = f" (bundled pipelines: {', '.join(bundled)})" if bare else ""
            raise ConfigError(f"pipeline file not found: {path}{known}")
        try:
            tree = yaml.load(path.read_text(), Loader=_Loader) or {}
        except yaml.YAMLError as exc:
            raise ConfigError(
                f"pipeline file {path} is not valid YAML: {exc}".replace("\n", " ")
            ) from None
        if not isinstance(tree, dict):
            raise ConfigError(f"pipeline file {path} must hold a mapping of sections")
    return with_overrides(PipelineConfig, tree, overrides)


def with_overrides(model: type[M], tree: dict[str, Any], overrides: list[str]) -> M:
    """Validate `tree` as `model` after applying `--set key.path=value` overrides."""
    for assignment in overrides:
        _apply_override(tree, assignment)
    try:
        return model.model_validate(tree)
    except ValidationError as exc:
        raise ConfigError(_first_error(exc)) from None


_SECRET_WORDS = ("key", "secret", "token", "password")
# URL query parameters that carry credentials: SAS tokens (sig, ...), signed URLs, keys
_SECRET_PARAMS = ("sig", "signature", "credential", "key", "secret", "token", "password", "auth")


def redacted(config: BaseModel) -> dict[str, Any]:
    """A config as written to disk (the manifest, batch state): secret-looking values and URL
    credentials removed."""

    def clean(node: Any, name: str = "") -> Any:
        if isinstance(node, dict):
            return {k: clean(v, k) for k, v in node.items()}
        if isinstance(node, list):
            return [clean(v) for v in node]
        if isinstance(node, str):
            # `api_key_env` names a variable and `key_col` a column: they hold no secret
            secret = any(word in name.lower() for word in _SECRET_WORDS)
            if secret and not name.endswith(("_env", "_col")):
                return "***"
            return _clean_url(node)
        return node

    return clean(config.model_dump(mode="json"))


def _clean_url(text: str) -> str:
    """A URL or path without `user:password@` and without the values of secret-looking query
    parameters (`?sig=`, `?api-key=`, `?client_secret=`, SAS tokens)."""
    parts = urlsplit(text)
    if parts.scheme and parts.password:
        host = parts.hostname or ""
        parts = parts._replace(netloc=host + (f":{parts.port}" if parts.port else ""))
    if parts.query and "=" in parts.query:
        pairs = parse_qsl(parts.query, keep_blank_values=True)
        secret = [
            (name, "***" if any(w in name.lower().replace("-", "_") for w in _SECRET_PARAMS) else v)
            for name, v in pairs
        ]
        if secret != pairs:
            parts = parts._replace(query=urlencode(secret, safe="*:/"))
    return urlunsplit(parts) if parts.geturl() != text else text

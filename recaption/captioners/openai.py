"""The `openai` captioner: any OpenAI-compatible chat-completions endpoint.

GPT-4.1 on OpenAI, an Azure OpenAI deployment, or a local VLM behind vLLM / SGLang / Ollama.
One image per request, sent as a base64 data URL; the caption schema as structured output
where the server supports it. Per attempt:

    pool.acquire (rate limits, healthy endpoint with the most free quota)
      ─▶ chat.completions.create ─▶ parse + schema check ─▶ CaptionResult
    retried by tenacity with full-jitter backoff; a 429 pauses the endpoint for everyone.

The official SDK does the HTTP; its own retries are off because the limiter and tenacity
decide when to try again. API keys come from the environment and are never logged.
"""

from __future__ import annotations

import asyncio
import base64
import email.utils
import json
import os
import random
import re
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import openai
from pydantic import ValidationError
from tenacity import (
    AsyncRetrying,
    RetryCallState,
    retry_if_exception_type,
    wait_random_exponential,
)

from recaption.captioners import CaptionerFatal, CaptionFailure, CaptionResult
from recaption.config import CaptionerConfig, ConfigError, EndpointConfig, LimitsConfig
from recaption.images import PreparedImage
from recaption.limits import EndpointLimiter, Permit, Quota
from recaption.pricing import Price, image_tokens, price_for
from recaption.records import Caption, Reason
from recaption.validation import REFUSALS

DEFAULT_MODEL = "gpt-4.1"
PROMPTS = Path(__file__).resolve().parent.parent / "prompts"
BENCH_AFTER = 5  # consecutive transport failures before an endpoint is benched
BENCH_S = 30.0
_MAX_RATE_LIMITED = 50  # 429s one image may meet before it is rejected as rate_limited
# read by the SDK or by us; forwarded to worker actors on other nodes
ENV_VARS = (
    "OPENAI_BASE_URL",
    "OPENAI_ORG_ID",
    "OPENAI_PROJECT_ID",
    "AZURE_OPENAI_ENDPOINT",
    "OPENAI_API_VERSION",
)
USER_TEXT = "Caption this image."  # sent with each image, after the system prompt
_MIME = {"jpeg": "image/jpeg", "webp": "image/webp", "png": "image/png"}


# --- prompts and endpoints --------------------------------------------------------------------


def load_prompt(name: str) -> tuple[str, str]:
    """(version, text) of a bundled prompt name or a prompt file; the version is its stem."""
    path = Path(name) if name.endswith((".md", ".txt")) else PROMPTS / f"{name}.md"
    if not path.is_file():
        bundled = ", ".join(sorted(p.stem for p in PROMPTS.glob("*.md")))
        raise ConfigError(f"captioner.prompt {name!r}: no such file (bundled: {bundled})")
    return path.stem, path.read_text().strip()


def prompt_with_schema(prompt: str) -> str:
    """The prompt for output modes that carry no schema on the wire (JSON mode, text)."""
    schema = json.dumps(Caption.model_json_schema())
    return f"{prompt}\n\nReply with only the JSON object, matching this JSON Schema:\n{schema}"


def endpoint_configs(cfg: CaptionerConfig, limits: LimitsConfig) -> list[EndpointConfig]:
    """The endpoint pool; without `captioner.endpoints`, one made of the top-level keys."""
    if cfg.endpoints:
        names = [e.name for e in cfg.endpoints]
        if len(set(names)) != len(names):
            raise ConfigError("captioner.endpoints: names must be unique")
        return cfg.endpoints
    return [
        EndpointConfig(
            name="default",
            api=cfg.api,
            base_url=cfg.base_url,
            api_version=cfg.api_version,
            rpm=limits.rpm,
            tpm=limits.tpm,
            max_in_flight=cfg.max_in_flight,
        )
    ]


def key_env(ep: EndpointConfig) -> str:
    return ep.api_key_env or ("AZURE_OPENAI_API_KEY" if ep.api == "azure" else "OPENAI_API_KEY")


def check_credentials(ep: EndpointConfig) -> None:
    """Fail before any work when an endpoint cannot be called; says which variable is missing."""
    if ep.api == "azure":
        missing = [key_env(ep)] if not os.environ.get(key_env(ep)) else []
        if not (ep.base_url or os.environ.get("AZURE_OPENAI_ENDPOINT")):
            missing.append("AZURE_OPENAI_ENDPOINT (or base_url)")
        if not (ep.api_version or os.environ.get("OPENAI_API_VERSION")):
            missing.append("OPENAI_API_VERSION (or api_version)")
    else:
        # a local server (base_url set) may need no key; api.openai.com always does
        local = ep.base_url or os.environ.get("OPENAI_BASE_URL")
        missing = [] if local or os.environ.get(key_env(ep)) else [key_env(ep)]
    if missing:
        raise ConfigError(
            f"missing credentials for endpoint {ep.name!r}: set {' and '.join(missing)}"
        )


def make_client(ep: EndpointConfig, timeout_s: float) -> openai.AsyncOpenAI:
    key = os.environ.get(key_env(ep))
    if ep.api == "azure":
        return openai.AsyncAzureOpenAI(
            api_key=key,
            azure_endpoint=ep.base_url or os.environ.get("AZURE_OPENAI_ENDPOINT"),
            api_version=ep.api_version or os.environ.get("OPENAI_API_VERSION"),
            max_retries=0,
            timeout=timeout_s,
        )
    return openai.AsyncOpenAI(
        api_key=key or "not-needed",  # local servers ignore it; the SDK insists on one
        base_url=ep.base_url or os.environ.get("OPENAI_BASE_URL") or None,
        max_retries=0,
        timeout=timeout_s,
    )


async def preflight(cfg: CaptionerConfig, limits: LimitsConfig) -> None:
    """Is every endpoint reachable and does it take our key? Costs no tokens (GET /models)."""
    for ep in endpoint_configs(cfg, limits):
        check_credentials(ep)
        client = make_client(ep, timeout_s=15)
        try:
            await client.models.list()
        except openai.AuthenticationError as exc:
            raise CaptionerFatal(_auth_message(ep, exc)) from None
        except openai.APIConnectionError as exc:
            url = str(client.base_url).rstrip("/")
            raise CaptionerFatal(
                f"endpoint {ep.name!r} at {url} is unreachable: {_cause(exc)}"
            ) from None
        except openai.APIStatusError:
            pass  # it answered: some servers (Azure deployments) have no /models
        finally:
            await client.close()


def _auth_message(ep: EndpointConfig, exc: openai.APIStatusError) -> str:
    return (
        f"endpoint {ep.name!r} refused the API key from ${key_env(ep)} "
        f"(HTTP {exc.status_code}); stopping instead of rejecting every image"
    )


def _cause(exc: BaseException) -> str:
    while exc.__cause__ is not None:
        exc = exc.__cause__
    return str(exc) or type(exc).__name__


# --- one endpoint -----------------------------------------------------------------------------


class Endpoint:
    """A deployment as one worker sees it: client, quota, health and what output modes work."""

    def __init__(self, ep: EndpointConfig, quota: Quota, cfg: CaptionerConfig):
        self.config = ep
        self.name = ep.name
        self.model = ep.model or cfg.model or DEFAULT_MODEL
        self.quota = quota
        self.timeout_s = cfg.timeout_s
        self.mode = "json_schema" if cfg.response_format == "auto" else cfg.response_format
        self.fallback = cfg.response_format == "auto"
        self.failures = 0
        self.benched_until = 0.0
        self.probing = False
        self.in_flight = 0  # this worker's requests to it now; capped by max_in_flight
        self._client: openai.AsyncOpenAI | None = None
        self._loop: asyncio.AbstractEventLoop | None = None

    @property
    def client(self) -> openai.AsyncOpenAI:
        # one connection pool per worker and event loop (a pool cannot outlive its loop)
        loop = asyncio.get_running_loop()
        if self._client is None or self._loop is not loop:
            self._client, self._loop = make_client(self.config, self.timeout_s), loop
        return self._client

    async def aclose(self) -> None:
        if self._client is not None:
            await self._client.close()
            self._client = self._loop = None

    def healthy(self, now: float) -> bool:
        return now >= self.benched_until and not self.probing

    @property
    def slots(self) -> float:
        """Requests it may still take from this worker now."""
        cap = self.config.max_in_flight
        return float("inf") if cap is None else cap - self.in_flight

    async def probe(self) -> None:
        """Back from the bench only if it answers GET /models (no tokens); else benched again,
        so no image spends an attempt on a server that is still down."""
        self.probing = True
        try:
            await self.client.models.list(timeout=5)
            self.benched_until = 0.0
        except openai.APIStatusError:
            self.benched_until = 0.0  # it answered: some servers have no /models
        except openai.APIError:
            self.benched_until = time.monotonic() + BENCH_S
        finally:
            self.probing = False

    def record(self, transport_ok: bool) -> None:
        if transport_ok:
            self.failures = 0
            return
        self.failures += 1
        if self.failures >= BENCH_AFTER:  # keeps failing: let the others carry the load
            self.benched_until = time.monotonic() + BENCH_S
            self.failures = 0

    def degrade(self) -> bool:
        """The server rejected our response_format: use the next simpler one, if allowed."""
        nxt = {"json_schema": "json_object", "json_object": "text"}.get(self.mode)
        if not self.fallback or nxt is None:
            return False
        self.mode = nxt
        return True


class EndpointPool:
    def __init__(self, endpoints: list[Endpoint]):
        self.endpoints = endpoints

    async def acquire(self, tokens: int) -> tuple[Endpoint, Permit]:
        """A permit from a healthy endpoint with room, the one with the most free quota (or,
        for self-hosted servers, the most free in-flight slots) first."""
        while True:
            now = time.monotonic()
            for endpoint in self.endpoints:
                if (
                    endpoint.benched_until
                    and now >= endpoint.benched_until
                    and not endpoint.probing
                ):
                    await endpoint.probe()
            healthy = [e for e in self.endpoints if e.healthy(now)]
            if not healthy:  # all benched: wait for the first to come back
                soonest = min(e.benched_until for e in self.endpoints) - now
                await asyncio.sleep(min(max(soonest, 0.05), 1.0))
                continue
            waits = []
            with_room = [e for e in healthy if e.slots > 0]
            for endpoint in sorted(with_room, key=lambda e: (-e.quota.free, -e.slots)):
                got = await endpoint.quota.try_acquire(tokens)
                if isinstance(got, Permit):
                    return endpoint, got
                waits.append(got)
            # no room anywhere: a slot frees when a reply comes, so look again soon
            await asyncio.sleep(min(max(min(waits, default=0.005), 0.005), 1.0))


# --- the captioner ----------------------------------------------------------------------------


class Retry(Exception):
    """An attempt failed in a way worth another try."""

    def __init__(self, reason: Reason, detail: str, rate_limited: bool = False):
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail
        self.rate_limited = rate_limited


@dataclass
class Tries:
    """One image's attempts: what is sent each time, and what they used."""

    max_tokens: int
    image_url: str  # the prepared image as a base64 data URL, encoded once
    image_tokens: int
    attempts: int = 0  # HTTP attempts, all told
    rate_limited: int = 0  # of which answered 429: these cost nothing and spend no budget
    refusals: int = 0
    truncations: int = 0
    input_tokens: int = 0
    output_tokens: int = 0
    cost_usd: float = 0.0  # each attempt at its own price (batch attempts cost half)
    outcomes: Counter[str] = field(default_factory=Counter)  # requests and what came back

    def paid(self, usage: Any, price: Price) -> None:
        self.input_tokens += usage.prompt_tokens
        self.output_tokens += usage.completion_tokens
        self.cost_usd += price.cost(usage.prompt_tokens, usage.completion_tokens)


_full_jitter = wait_random_exponential(multiplier=0.5, max=20)


def _wait(state: RetryCallState) -> float:
    exc = state.outcome.exception() if state.outcome else None
    if isinstance(exc, Retry) and exc.rate_limited:
        return random.uniform(0, 0.05)  # the endpoint's pause already holds everyone back
    return _full_jitter(state)


def retry_after(headers: Any) -> float | None:
    """Seconds from `retry-after-ms`, `retry-after` (seconds or an HTTP date), or None."""
    if ms := headers.get("retry-after-ms"):
        try:
            return float(ms) / 1000
        except ValueError:
            pass
    value = headers.get("retry-after")
    if not value:
        return None
    try:
        return float(value)
    except ValueError:
        when = email.utils.parsedate_to_datetime(value)
        return max(0.0, when.timestamp() - time.time()) if when else None


def parse_json_object(text: str) -> Any:
    """The JSON object in a reply: bare, fenced in ```json, or wrapped in prose."""
    text = text.strip()
    fenced = re.search(r"```(?:json)?\s*(.*?)```", text, re.DOTALL)
    if fenced:
        text = fenced.group(1).strip()
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        start, end = text.find("{"), text.rfind("}")
        if 0 <= start < end:
            return json.loads(text[start : end + 1])  # JSONDecodeError if still broken
        raise


class OpenAICaptioner:
    backend = "openai"

    def __init__(
        self,
        cfg: CaptionerConfig,
        limits: LimitsConfig,
        limiters: dict[str, Any] | None = None,
    ):
        """`limiters`: endpoint name -> LimiterActor handle shared by the run's workers;
        None: in-process limiters (one worker, tests)."""
        self.cfg = cfg
        self.model = cfg.model or DEFAULT_MODEL
        self.prompt_version, self.prompt = load_prompt(cfg.prompt)
        configs = endpoint_configs(cfg, limits)
        for ep in configs:
            check_credentials(ep)
        self.pool = EndpointPool(
            [
                Endpoint(
                    ep,
                    Quota(
                        limiters[ep.name] if limiters else EndpointLimiter(rpm=ep.rpm, tpm=ep.tpm)
                    ),
                    cfg,
                )
                for ep in configs
            ]
        )
        self.price: Price = price_for(self.model, cfg.price)
        schema = Caption.model_json_schema()
        self.schema = {
            "type": "json_schema",
            "json_schema": {"name": "caption", "strict": True, "schema": schema},
        }
        # without a schema on the wire (JSON mode, plain text) the prompt spells it out
        self.prompt_with_schema = prompt_with_schema(self.prompt)
        self.counters: Counter[str] = Counter()  # requests and their outcomes, for progress

    async def aclose(self) -> None:
        for endpoint in self.pool.endpoints:
            await endpoint.aclose()

    # -- one image ----------------------------------------------------------------------------

    def tries(self, image: PreparedImage) -> Tries:
        return Tries(
            max_tokens=self.cfg.max_output_tokens,
            image_url="",  # encoded when a request is made
            image_tokens=self.image_tokens(image),
        )

    def image_tokens(self, image: PreparedImage) -> int:
        return image_tokens(self.model, image.width, image.height, self.cfg.image.detail)

    def data_url(self, image: PreparedImage) -> str:
        data = base64.b64encode(image.data).decode()
        return f"data:{_MIME[self.cfg.image.format]};base64,{data}"

    async def caption(self, image: PreparedImage, prior: Tries | None = None) -> CaptionResult:
        """`prior`: attempts already made elsewhere (a batch); they count against the budget."""
        tries = prior or self.tries(image)
        tries.image_url = tries.image_url or self.data_url(image)
        tries.image_tokens = tries.image_tokens or self.image_tokens(image)
        budget = self.cfg.max_attempts

        def out_of_attempts(state: RetryCallState) -> bool:
            paid = tries.attempts - tries.rate_limited
            return paid >= budget or tries.rate_limited >= _MAX_RATE_LIMITED

        retrying = AsyncRetrying(
            stop=out_of_attempts,
            wait=_wait,
            retry=retry_if_exception_type(Retry),
            reraise=True,
        )
        try:
            async for attempt in retrying:
                with attempt:
                    caption = await self._attempt(tries)
        except Retry as exc:  # out of attempts
            raise self._failure(exc.reason, exc.detail, tries) from None
        return self._result(caption, tries)

    def _result(self, caption: Caption, tries: Tries) -> CaptionResult:
        return CaptionResult(
            caption=caption,
            input_tokens=tries.input_tokens,
            output_tokens=tries.output_tokens,
            cost_usd=tries.cost_usd,
            attempts=tries.attempts,
            outcomes=tries.outcomes,
        )

    def _count(self, tries: Tries, outcome: str) -> None:
        tries.outcomes[outcome] += 1
        self.counters[outcome] += 1

    def _failure(self, reason: Reason, detail: str, tries: Tries) -> CaptionFailure:
        return CaptionFailure(
            reason,
            detail,
            tries.attempts,
            input_tokens=tries.input_tokens,
            output_tokens=tries.output_tokens,
            cost_usd=tries.cost_usd,
            outcomes=tries.outcomes,
        )

    def _request(self, endpoint: Endpoint, tries: Tries) -> dict:
        system = self.prompt if endpoint.mode == "json_schema" else self.prompt_with_schema
        request: dict[str, Any] = {
            "model": endpoint.model,
            "messages": [
                {"role": "system", "content": system},
                {
                    "role": "user",
                    "content": [
                        {"type": "text", "text": USER_TEXT},
                        {
                            "type": "image_url",
                            "image_url": {
                                "url": tries.image_url,
                                "detail": self.cfg.image.detail,
                            },
                        },
                    ],
                },
            ],
            "max_completion_tokens": tries.max_tokens,
        }
        if endpoint.mode == "json_schema":
            request["response_format"] = self.schema
        elif endpoint.mode == "json_object":
            request["response_format"] = {"type": "json_object"}
        if self.cfg.temperature is not None:
            request["temperature"] = self.cfg.temperature
        return request

    async def _attempt(self, tries: Tries) -> Caption:
        # text at ~3 characters a token overestimates a little; `settle` corrects it
        text_tokens = len(self.prompt_with_schema) // 3 + 40
        estimate = text_tokens + tries.image_tokens + tries.max_tokens
        endpoint, permit = await self.pool.acquire(estimate)
        endpoint.in_flight += 1
        try:
            return await self._send(endpoint, permit, tries)
        finally:
            endpoint.in_flight -= 1

    async def _send(self, endpoint: Endpoint, permit: Permit, tries: Tries) -> Caption:
        tries.attempts += 1
        self._count(tries, "requests")
        request = self._request(endpoint, tries)
        try:
            raw = await endpoint.client.chat.completions.with_raw_response.create(**request)
            completion = raw.parse()
        except openai.RateLimitError as exc:
            self._count(tries, "rate_limited")
            tries.rate_limited += 1
            endpoint.quota.observe(exc.response.headers, permit)
            endpoint.quota.pause(retry_after(exc.response.headers) or 1.0)
            raise Retry(Reason.rate_limited, _message(exc), rate_limited=True) from None
        except openai.AuthenticationError as exc:
            raise CaptionerFatal(_auth_message(endpoint.config, exc)) from None
        except openai.NotFoundError as exc:
            raise CaptionerFatal(
                f"endpoint {endpoint.name!r} has no model {endpoint.model!r} (HTTP 404): {_message(exc)}"
            ) from None
        except openai.BadRequestError as exc:
            if _about_response_format(exc) and endpoint.degrade():
                self._count(tries, "response_format_fallback")
                raise Retry(Reason.bad_request, _message(exc)) from None
            raise self._failure(Reason.bad_request, _message(exc), tries) from None
        except openai.PermissionDeniedError as exc:
            raise self._failure(Reason.forbidden, _message(exc), tries) from None
        except openai.APIStatusError as exc:  # 408, 409, 5xx and anything else odd
            self._count(tries, f"http_{exc.status_code}")
            if exc.status_code in (408, 409) or exc.status_code >= 500:
                endpoint.record(transport_ok=False)
                raise Retry(Reason.server_error, _message(exc)) from None
            raise self._failure(Reason.caption_error, _message(exc), tries) from None
        except openai.APIConnectionError as exc:  # timeouts, refused and dropped connections
            self._count(tries, "connection_error")
            endpoint.record(transport_ok=False)
            raise Retry(Reason.server_error, f"{type(exc).__name__}: {_cause(exc)}") from None
        except (openai.APIResponseValidationError, json.JSONDecodeError) as exc:
            self._count(tries, "broken_response")
            raise Retry(Reason.schema_invalid, f"unreadable response: {exc}") from None
        endpoint.record(transport_ok=True)
        endpoint.quota.observe(raw.headers, permit)
        usage = completion.usage
        if usage is not None:
            tries.paid(usage, self.price)
            # how OpenAI and Azure count TPM: prompt tokens + the max output asked for
            endpoint.quota.settle(permit, usage.prompt_tokens + tries.max_tokens)
        return self._read(completion, tries)

    def _read(self, completion: Any, tries: Tries) -> Caption:
        if not completion.choices:
            raise Retry(Reason.schema_invalid, "response has no choices")
        choice = completion.choices[0]
        content = (choice.message.content or "").strip()
        refusal = getattr(choice.message, "refusal", None)
        if refusal or choice.finish_reason == "content_filter" or REFUSALS.match(content):
            tries.refusals += 1
            self._count(tries, "refusal")
            detail = (refusal or content or f"finish_reason={choice.finish_reason}")[:200]
            if tries.refusals > self.cfg.refusal_retries:
                raise self._failure(Reason.refusal, detail, tries)
            raise Retry(Reason.refusal, detail)
        if choice.finish_reason == "length":
            tries.truncations += 1
            self._count(tries, "truncated")
            if tries.truncations > 1:
                raise self._failure(
                    Reason.truncated_output,
                    f"output cut at max_completion_tokens={tries.max_tokens}",
                    tries,
                )
            tries.max_tokens *= 2  # once, with room to finish
            raise Retry(Reason.truncated_output, "finish_reason=length")
        try:
            return Caption.model_validate(parse_json_object(content))
        except json.JSONDecodeError as exc:
            self._count(tries, "broken_json")
            raise Retry(Reason.schema_invalid, f"not JSON ({exc.msg}): {content[:120]!r}") from None
        except ValidationError as exc:
            self._count(tries, "schema_invalid")
            err = exc.errors()[0]
            where = ".".join(str(p) for p in err["loc"]) or "reply"
            raise Retry(Reason.schema_invalid, f"{where}: {err['msg']}") from None


def _message(exc: openai.APIStatusError) -> str:
    body = exc.body
    if isinstance(body, dict):
        body = body.get("error", body)
        if isinstance(body, dict) and body.get("message"):
            return f"HTTP {exc.status_code}: {body['message']}"[:300]
    return f"HTTP {exc.status_code}: {exc.message}"[:300]


def _about_response_format(exc: openai.BadRequestError) -> bool:
    text = _message(exc).lower()
    return any(word in text for word in ("response_format", "json_schema", "json_object"))

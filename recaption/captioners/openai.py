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

import base64
import email.utils
import json
import os
import random
import time
from dataclasses import dataclass, field
from typing import Any

import httpx
import openai
from openai.types.chat import ChatCompletion
from pydantic import ValidationError
from tenacity import (
    AsyncRetrying,
    RetryCallState,
    retry_if_exception_type,
    wait_random_exponential,
)

from recaption.captioners.base import Captioner, CaptionFailure, CaptionResult
from recaption.captioners.endpoints import (
    DEFAULT_MODEL,
    ENV_VARS,
    Endpoint,
    EndpointPool,
    auth_message,
    cause,
    check_credentials,
    endpoint_configs,
    endpoint_limits,
    key_env,
    preflight,
)
from recaption.captioners.prompt import (
    USER_TEXT,
    load_prompt,
    parse_json_object,
    prompt_with_schema,
)
from recaption.config import EndpointConfig, PipelineConfig
from recaption.errors import CaptionerFatal, Rejected
from recaption.images import PreparedImage
from recaption.limits import EndpointLimiter, EndpointLimits
from recaption.pricing import Price, image_tokens, price_for
from recaption.quota import Permit, Quota
from recaption.records import Caption, Reason, Usage
from recaption.validation import REFUSALS

_MAX_RATE_LIMITED = 50  # 429s one image may meet before it is rejected as rate_limited
_MIME = {"jpeg": "image/jpeg", "webp": "image/webp", "png": "image/png"}
_SLOT = b"@@recaption-image@@"  # where the image's base64 goes in a serialised request


class Retry(Rejected):
    """An attempt failed in a way worth another try; out of tries, the image is rejected
    with its reason."""

    def __init__(self, reason: Reason, detail: str, rate_limited: bool = False):
        super().__init__(reason, detail)
        self.rate_limited = rate_limited


@dataclass
class Tries:
    """One image's attempts: what is sent each time, and what they used."""

    max_tokens: int
    image_b64: bytes  # the prepared image in base64, encoded once
    image_tokens: int
    # HTTP attempts, all told; each paid at its own price (batch attempts cost half)
    usage: Usage = field(default_factory=Usage)
    rate_limited: int = 0  # attempts answered 429: these cost nothing and spend no budget
    refusals: int = 0
    truncations: int = 0

    def paid(self, usage: Any, price: Price) -> None:
        self.usage.input_tokens += usage.prompt_tokens
        self.usage.output_tokens += usage.completion_tokens
        self.usage.cost_usd += price.cost(usage.prompt_tokens, usage.completion_tokens)


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


class OpenAICaptioner(Captioner):
    backend = "openai"
    paid = True

    def __init__(self, config: PipelineConfig, limiters: dict[str, Any] | None = None):
        """`limiters`: endpoint name -> LimiterActor handle shared by the run's workers;
        None: in-process limiters (one worker, tests)."""
        super().__init__(config, limiters)
        self.cfg = cfg = config.captioner
        limits = config.limits
        self.model = cfg.model or DEFAULT_MODEL
        self.prompt_version, self.prompt = load_prompt(cfg.prompt)
        configs = endpoint_configs(cfg, limits)
        for ep in configs:
            check_credentials(ep)
        shared = endpoint_limits(cfg, limits)

        def quota(ep: EndpointConfig) -> Quota:
            limiter = limiters[ep.name] if limiters else EndpointLimiter(**vars(shared[ep.name]))
            return Quota(limiter, slots=ep.max_in_flight is not None)

        self.pool = EndpointPool([Endpoint(ep, quota(ep), cfg) for ep in configs])
        self.price: Price = price_for(self.model, cfg.price)
        schema = Caption.model_json_schema()
        self.schema = {
            "type": "json_schema",
            "json_schema": {"name": "caption", "strict": True, "schema": schema},
        }
        # without a schema on the wire (JSON mode, plain text) the prompt spells it out
        self.prompt_with_schema = prompt_with_schema(self.prompt)
        self._frames: dict[tuple[str, str, int], tuple[bytes, bytes]] = {}  # see `_body`
        # text at ~3 characters a token overestimates a little; `settle` corrects it
        self.text_tokens = len(self.prompt_with_schema) // 3 + 40

    # -- what the driver asks before any worker -----------------------------------------------

    @classmethod
    def identity(cls, cfg: PipelineConfig) -> tuple[str, str]:
        return cfg.captioner.model or DEFAULT_MODEL, load_prompt(cfg.captioner.prompt)[0]

    @classmethod
    def check(cls, cfg: PipelineConfig) -> None:
        for ep in endpoint_configs(cfg.captioner, cfg.limits):
            check_credentials(ep)

    @classmethod
    async def preflight(cls, cfg: PipelineConfig) -> None:
        await preflight(cfg.captioner, cfg.limits)

    @classmethod
    def worker_env(cls, cfg: PipelineConfig) -> dict[str, str]:
        endpoints = endpoint_configs(cfg.captioner, cfg.limits)
        names = {*ENV_VARS, *(key_env(ep) for ep in endpoints)}
        return {name: os.environ[name] for name in sorted(names) if name in os.environ}

    @classmethod
    def metered_endpoints(cls, cfg: PipelineConfig) -> dict[str, EndpointLimits]:
        return endpoint_limits(cfg.captioner, cfg.limits)

    async def aclose(self) -> None:
        for endpoint in self.pool.endpoints:
            await endpoint.aclose()

    # -- one image ----------------------------------------------------------------------------

    def tries(self, image: PreparedImage) -> Tries:
        return Tries(
            max_tokens=self.cfg.max_output_tokens,
            image_b64=b"",  # encoded when a request is made
            image_tokens=self.image_tokens(image),
        )

    def most(self, tries: Tries, price: Price) -> float:
        """The most one attempt can cost: its input as estimated, and all of max_tokens."""
        return price.cost(self.text_tokens + tries.image_tokens, tries.max_tokens)

    def image_tokens(self, image: PreparedImage) -> int:
        return image_tokens(self.model, image.width, image.height, self.cfg.image.detail)

    async def caption(self, image: PreparedImage, prior: Tries | None = None) -> CaptionResult:
        """`prior`: attempts already made elsewhere (a batch); they count against the budget."""
        tries = prior or self.tries(image)
        tries.image_b64 = tries.image_b64 or base64.b64encode(image.data)
        tries.image_tokens = tries.image_tokens or self.image_tokens(image)
        budget = self.cfg.max_attempts

        def out_of_attempts(state: RetryCallState) -> bool:
            paid = tries.usage.attempts - tries.rate_limited
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
        return CaptionResult(caption=caption, usage=tries.usage)

    def _count(self, tries: Tries, outcome: str) -> None:
        tries.usage.outcomes[outcome] += 1
        self.counters[outcome] += 1

    def _failure(self, reason: Reason, detail: str, tries: Tries) -> CaptionFailure:
        return CaptionFailure(reason, detail, tries.usage)

    def _request(self, endpoint: Endpoint, tries: Tries) -> dict:
        system = self.prompt if endpoint.mode == "json_schema" else self.prompt_with_schema
        mime = _MIME[self.cfg.image.format]
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
                                "url": f"data:{mime};base64,{tries.image_b64.decode()}",
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

    def _body(self, endpoint: Endpoint, tries: Tries) -> bytes:
        """`_request` as the JSON bytes the SDK would send (its separators, UTF-8). The
        request around the image is serialised once per endpoint mode and output cap:
        encoding the ~70 KB base64 string with json.dumps cost ~5% of a worker's CPU."""
        key = (endpoint.mode, endpoint.model, tries.max_tokens)
        if key not in self._frames:
            slot = Tries(max_tokens=tries.max_tokens, image_b64=_SLOT, image_tokens=0)
            request = self._request(endpoint, slot)
            text = json.dumps(request, ensure_ascii=False, separators=(",", ":")).encode()
            head, tail = text.split(_SLOT)  # base64 needs no JSON escaping
            self._frames[key] = (head, tail)
        head, tail = self._frames[key]
        return b"".join((head, tries.image_b64, tail))

    async def _attempt(self, tries: Tries) -> Caption:
        estimate = self.text_tokens + tries.image_tokens + tries.max_tokens
        # the most this attempt can cost, held against the spend cap until it is answered
        most = self.most(tries, self.price)
        if self.budget is not None:
            await self.budget.reserve(most)
        before = tries.usage.cost_usd
        try:
            endpoint, permit = await self.pool.acquire(estimate)
            try:
                return await self._send(endpoint, permit, tries)
            finally:
                endpoint.quota.done(permit)
        finally:
            if self.budget is not None:
                self.budget.settle(most, tries.usage.cost_usd - before)

    async def _send(self, endpoint: Endpoint, permit: Permit, tries: Tries) -> Caption:
        tries.usage.attempts += 1
        self._count(tries, "requests")
        try:
            # The SDK's generic POST: its auth, Azure routing, timeouts and errors, without
            # `create`'s walk of every message and schema dict (~1 ms a request); the body
            # goes as bytes, the reply is validated once, by pydantic-core, from its JSON.
            raw = await endpoint.client.post(
                endpoint.chat_path, body=self._body(endpoint, tries), cast_to=httpx.Response
            )
            completion = ChatCompletion.model_validate_json(raw.content)
        except openai.RateLimitError as exc:
            self._count(tries, "rate_limited")
            tries.rate_limited += 1
            endpoint.quota.observe(exc.response.headers, permit)
            endpoint.quota.pause(retry_after(exc.response.headers) or 1.0)
            raise Retry(Reason.rate_limited, _message(exc), rate_limited=True) from None
        except openai.AuthenticationError as exc:
            raise CaptionerFatal(auth_message(endpoint.config, exc)) from None
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
            raise Retry(Reason.server_error, f"{type(exc).__name__}: {cause(exc)}") from None
        except ValidationError as exc:  # not JSON, or not a chat completion
            self._count(tries, "broken_response")
            first = exc.errors()[0]
            where = ".".join(str(p) for p in first["loc"])
            raise Retry(
                Reason.schema_invalid, f"unreadable response: {where} {first['msg']}"
            ) from None
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

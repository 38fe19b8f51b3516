"""Where requests go: endpoint configs, credentials, SDK clients, and the pool that picks a
healthy endpoint with free quota for each attempt.

An endpoint is one deployment (OpenAI, an Azure deployment, a self-hosted vLLM server) with
its own key, quota and health. Workers share each endpoint's quota through the run's
limiter actor, which also holds a self-hosted server's `max_in_flight` for all of them;
health is per worker.
"""

from __future__ import annotations

import asyncio
import os
import time
from urllib.parse import quote

import openai

from recaption.config import CaptionerConfig, EndpointConfig, LimitsConfig
from recaption.errors import CaptionerFatal, ConfigError
from recaption.limits import EndpointLimits
from recaption.quota import Permit, Quota

DEFAULT_MODEL = "gpt-4.1"
BENCH_AFTER = 5  # consecutive transport failures before an endpoint is benched
BENCH_S = 30.0
# read by the SDK or by us; forwarded to worker actors on other nodes
ENV_VARS = (
    "OPENAI_BASE_URL",
    "OPENAI_ORG_ID",
    "OPENAI_PROJECT_ID",
    "AZURE_OPENAI_ENDPOINT",
    "OPENAI_API_VERSION",
)


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


def endpoint_limits(cfg: CaptionerConfig, limits: LimitsConfig) -> dict[str, EndpointLimits]:
    """What each endpoint's shared limiter holds: quota, burst, capacity."""
    return {
        ep.name: EndpointLimits(
            rpm=ep.rpm,
            tpm=ep.tpm,
            burst_s=limits.burst_s,
            max_in_flight=ep.max_in_flight,
            request_s=cfg.timeout_s + 10,  # the SDK's timeout, and a lease's life before it
        )
        for ep in endpoint_configs(cfg, limits)
    }


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
            http_client=openai.DefaultAioHttpClient(timeout=timeout_s),
        )
    return openai.AsyncOpenAI(
        api_key=key or "not-needed",  # local servers ignore it; the SDK insists on one
        base_url=ep.base_url or os.environ.get("OPENAI_BASE_URL") or None,
        max_retries=0,
        timeout=timeout_s,
        http_client=openai.DefaultAioHttpClient(timeout=timeout_s),
    )


async def preflight(cfg: CaptionerConfig, limits: LimitsConfig) -> None:
    """Is every endpoint reachable and does it take our key? Costs no tokens (GET /models)."""
    for ep in endpoint_configs(cfg, limits):
        check_credentials(ep)
        client = make_client(ep, timeout_s=15)
        try:
            await client.models.list()
        except openai.AuthenticationError as exc:
            raise CaptionerFatal(auth_message(ep, exc)) from None
        except openai.APIConnectionError as exc:
            url = str(client.base_url).rstrip("/")
            raise CaptionerFatal(
                f"endpoint {ep.name!r} at {url} is unreachable: {cause(exc)}"
            ) from None
        except openai.APIStatusError:
            pass  # it answered: some servers (Azure deployments) have no /models
        finally:
            await client.close()


def auth_message(ep: EndpointConfig, exc: openai.APIStatusError) -> str:
    return (
        f"endpoint {ep.name!r} refused the API key from ${key_env(ep)} "
        f"(HTTP {exc.status_code}); stopping instead of rejecting every image"
    )


def cause(exc: BaseException) -> str:
    while exc.__cause__ is not None:
        exc = exc.__cause__
    return str(exc) or type(exc).__name__


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
        self._client: openai.AsyncOpenAI | None = None
        self._loop: asyncio.AbstractEventLoop | None = None

    @property
    def client(self) -> openai.AsyncOpenAI:
        # one connection pool per worker and event loop (a pool cannot outlive its loop)
        loop = asyncio.get_running_loop()
        if self._client is None or self._loop is not loop:
            self._client, self._loop = make_client(self.config, self.timeout_s), loop
        return self._client

    @property
    def chat_path(self) -> str:
        """Where chat completions are POSTed. Azure names the deployment in the path, which
        the SDK adds only to a dict body (the captioner's goes as bytes)."""
        client = self.client
        if (
            isinstance(client, openai.AsyncAzureOpenAI)
            and "/deployments" not in client.base_url.path
        ):
            return f"/deployments/{quote(self.model, safe='')}/chat/completions"
        return "/chat/completions"

    async def aclose(self) -> None:
        if self._client is not None:
            await self._client.close()
            self._client = self._loop = None

    def healthy(self, now: float) -> bool:
        return now >= self.benched_until and not self.probing

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
            alone = len(healthy) == 1  # nothing else to try: wait in line for its permit
            for endpoint in sorted(healthy, key=lambda e: -e.quota.free):
                got = await endpoint.quota.try_acquire(tokens, wait=alone)
                if isinstance(got, Permit):
                    return endpoint, got
                waits.append(got)
            # no room anywhere: a slot frees when a reply comes, so look again soon
            await asyncio.sleep(min(max(min(waits, default=0.005), 0.005), 1.0))

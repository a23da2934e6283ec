"""Configuration: one TOML file, validated once at start so a typo fails loudly, not mid-batch."""

from __future__ import annotations

import base64
import binascii
import ipaddress
import os
import re
import tomllib
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from lowtide.vocabulary import ENDPOINTS, MESSAGES_ENDPOINT, WEBHOOK_EVENTS

# ASCII digits only (\d would take "٢٤h"), no spaces, one lower-case unit: "24h", "90m", "1.5h".
_DURATION = re.compile(r"([0-9]{1,9}(?:\.[0-9]{1,6})?)(s|m|h|d)", re.ASCII)
_UNIT_SECONDS = {"s": 1, "m": 60, "h": 3600, "d": 86400}
_HOST_NAME = re.compile(r"[a-z0-9_-]{1,63}(\.[a-z0-9_-]{1,63})*", re.ASCII)

# What each engine can serve, unless a route narrows it with `endpoints`.
ENGINE_ENDPOINTS = {
    "openai": tuple(ENDPOINTS),
    "echo": tuple(ENDPOINTS),
    "llamacpp": ("/v1/chat/completions", "/v1/completions", MESSAGES_ENDPOINT),
    "embeddings": ("/v1/embeddings",),
}


def parse_duration(text: str) -> float:
    """'90s', '15m', '24h', '7d' -> seconds; raises ValueError on anything else."""
    match = _DURATION.fullmatch(text)
    if not match:
        raise ValueError(
            f"invalid duration {text!r}; use a number and one of s, m, h, d (e.g. '24h')"
        )
    return float(match.group(1)) * _UNIT_SECONDS[match.group(2)]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class ModelRoute(_Strict):
    """One `[[models]]` entry: which engine serves requests whose body.model matches `name`."""

    name: str = Field(description="matched against body.model; '*' or a glob matches many")
    engine: Literal["openai", "llamacpp", "embeddings", "echo"] = "openai"
    base_url: str | None = None
    api_key_env: str | None = None
    api_key: str | None = None
    upstream_model: str | None = Field(None, description="model name sent upstream, if different")
    api: Literal["openai", "anthropic"] = Field(
        "openai",
        description="engine 'openai' only: 'anthropic' sends Messages requests through as they "
        "are (x-api-key, anthropic-version) to a server that speaks Anthropic's Messages API",
    )
    max_concurrency: int = Field(64, ge=1, le=100_000)
    timeout: float = Field(600.0, gt=0, description="seconds per upstream request")
    http_client: Literal["aiohttp", "pyreqwest"] = Field(
        "aiohttp",
        description="engine 'openai' only: the HTTP client library. 'pyreqwest' (Rust's reqwest) "
        "spends about half the CPU a request against a fast upstream (a GPU server on the "
        "same network); aiohttp is the long-proven default",
    )
    max_retries: int = Field(6, ge=0, le=100)
    headers: dict[str, str] = Field(default_factory=dict)
    latency_ms: float = Field(0.0, ge=0, description="echo engine only: simulated latency")
    # Local engines (llamacpp, embeddings).
    model_path: str | None = Field(
        None,
        description="GGUF file (llamacpp) or sentence-transformers folder (embeddings); default: the bundled model",
    )
    threads: int | None = Field(None, ge=1, description="CPU threads; default: all cores")
    parallel: int = Field(16, ge=1, le=256, description="llamacpp: sequences decoded together")
    context_size: int = Field(1024, ge=64, description="llamacpp: context tokens per sequence")
    weights: Literal["f16", "q8_0", "as-is"] = Field(
        "f16",
        description="llamacpp: convert the GGUF once (cached in the data folder) or use it as is",
    )
    prefix_cache: bool = Field(
        True,
        description="llamacpp: reuse the KV cells of a prompt prefix that other requests share",
    )
    group_prefixes: bool = Field(
        True,
        description="send a shard's lines that share a prompt prefix one after another, so the "
        "engine's prefix cache stays warm (results still commit in file order)",
    )
    batch_size: int = Field(64, ge=1, description="embeddings: inputs encoded together")
    # Admission (issue: throughput scheduling).
    rpm: int | None = Field(None, ge=1, description="requests per minute the upstream allows")
    tpm: int | None = Field(None, ge=1, description="tokens per minute the upstream allows")
    adaptive: bool | None = Field(
        None,
        description="adapt the concurrency window to 429s, errors and latency (default: on for 'openai')",
    )
    initial_concurrency: int | None = Field(
        None, ge=1, description="starting window (default min(8, max))"
    )
    min_concurrency: int = Field(1, ge=1)
    shared: bool = Field(False, description="interactive users share this upstream: yield to them")
    metrics_url: str | None = Field(None, description="the upstream's Prometheus /metrics (vLLM)")
    batch_priority: int | None = Field(
        None, description="send this as the request's 'priority' (vLLM: higher runs later)"
    )
    # Prices (issue: what a batch costs), per million tokens, at the synchronous list price.
    input_price: float | None = Field(None, ge=0, description="per 1M input tokens")
    cached_input_price: float | None = Field(
        None, ge=0, description="per 1M cached input tokens (default: input_price)"
    )
    output_price: float | None = Field(None, ge=0, description="per 1M output tokens")
    batch_price_factor: float = Field(
        0.5, ge=0, description="a batch line costs this share of the synchronous price"
    )

    @property
    def priced(self) -> bool:
        return self.input_price is not None or self.output_price is not None

    def sync_price(self, input_tokens: int, cached_tokens: int, output_tokens: int) -> float:
        """What these tokens cost at the synchronous list price (0 on a route without prices)."""
        full = self.input_price or 0.0
        cached = self.cached_input_price if self.cached_input_price is not None else full
        uncached = max(input_tokens - cached_tokens, 0)
        return (
            uncached * full
            + min(cached_tokens, input_tokens) * cached
            + output_tokens * (self.output_price or 0.0)
        ) / 1_000_000

    endpoints: list[str] | None = Field(
        None,
        description="batch endpoints this route serves (default: what its engine can serve)",
    )
    # The provider's own Batch API (issue: provider batches): lines of this route go out in
    # provider batches of at most these sizes, at the provider's batch price.
    upstream_batch: bool = Field(False, description="send this route's lines as provider batches")
    upstream_batch_max_lines: int = Field(50_000, ge=1, description="lines per provider batch")
    upstream_batch_max_bytes: int = Field(
        200 * 1000**2, ge=1024, description="bytes of one provider batch's input file"
    )
    upstream_batch_window: str = Field("24h", description="completion_window sent to the provider")
    upstream_batch_poll_seconds: float = Field(
        30.0, gt=0, description="first poll interval; it backs off while nothing changes"
    )
    upstream_batch_fallback: Literal["sync", "none"] = Field(
        "none",
        description="near the batch's deadline, run unfinished lines as synchronous calls",
    )
    # Structured outputs (issue 15): check each answer against the request's response_format
    # schema; a mismatch is retried (at most min(max_retries, 2) times), then `schema_violation`.
    validate_schema: bool = Field(
        False,
        description="validate each answer against the line's response_format json_schema; a "
        "line may set body.lowtide_validate_schema to override",
    )

    @field_validator("endpoints")
    @classmethod
    def _known_endpoints(cls, value: list[str] | None) -> list[str] | None:
        unknown = [e for e in value or [] if e not in ENDPOINTS]
        if unknown:
            raise ValueError(f"unknown endpoints {unknown}; Lowtide serves {list(ENDPOINTS)}")
        return value

    def served_endpoints(self) -> tuple[str, ...]:
        if self.endpoints is not None:
            return tuple(self.endpoints)
        if self.api == "anthropic":
            return (MESSAGES_ENDPOINT,)
        return ENGINE_ENDPOINTS[self.engine]

    @field_validator("base_url")
    @classmethod
    def _strip_slash(cls, value: str | None) -> str | None:
        return value.rstrip("/") if value else value

    @model_validator(mode="after")
    def _engine_needs(self) -> ModelRoute:
        if self.engine == "openai" and not self.base_url:
            raise ValueError(f"model route {self.name!r}: engine 'openai' needs base_url")
        if self.upstream_batch and self.engine != "openai":
            raise ValueError(
                f"model route {self.name!r}: upstream_batch needs engine 'openai' (a provider "
                "with a Files and Batches API)"
            )
        parse_duration(self.upstream_batch_window)
        if self.api == "anthropic" and (self.engine != "openai" or self.upstream_batch):
            raise ValueError(
                f"model route {self.name!r}: api 'anthropic' needs engine 'openai' (an HTTP "
                "upstream) and no upstream_batch"
            )
        return self

    def price_factor(self, *, provider_batch: bool = False) -> float:
        """The share of the synchronous price a line pays: a route that sends its lines as
        provider batches pays the batch price there and the full price when it calls
        synchronously (fallback); any other route bills at its batch_price_factor."""
        if self.upstream_batch and not provider_batch:
            return 1.0
        return self.batch_price_factor

    def resolved_api_key(self) -> str | None:
        if self.api_key_env:
            return os.environ.get(self.api_key_env)
        return self.api_key


class ApiKey(_Strict):
    key: str
    project: str = "default"
    admin: bool = Field(False, description="sees every project's usage and costs")


class ProjectLimits(_Strict):
    """`[projects.NAME]`: what one project may spend."""

    max_cost_per_day: float | None = Field(
        None, ge=0, description="batch cost a day (UTC), in `currency`; running batches pause at it"
    )
    max_enqueued_tokens: int | None = Field(
        None, ge=1, description="input + max output tokens of the project's unfinished batches"
    )


class AuthConfig(_Strict):
    api_keys: list[ApiKey] = Field(default_factory=list)


class BatchLimits(_Strict):
    max_file_bytes: int = 10 * 1024**3
    max_lines: int = 5_000_000
    max_errors_reported: int = 1000
    min_completion_window: str = "1h"
    max_completion_window: str = "7d"
    shard_lines: int = Field(1000, ge=1)
    shard_bytes: int = Field(8 * 1024**2, ge=1024)
    default_file_ttl: str = "30d"

    @field_validator("min_completion_window", "max_completion_window", "default_file_ttl")
    @classmethod
    def _duration(cls, value: str) -> str:
        parse_duration(value)
        return value


class MessageBatchLimits(_Strict):
    """`[message_batches]`: Anthropic's Message Batches API, with Anthropic's default limits."""

    max_requests: int = Field(100_000, ge=1, description="requests in one message batch")
    max_bytes: int = Field(
        256 * 1000**2, ge=1024, description="bytes of one create body (its `requests`)"
    )
    completion_window: str = Field(
        "24h", description="a message batch expires this long after creation"
    )

    @field_validator("completion_window")
    @classmethod
    def _duration(cls, value: str) -> str:
        parse_duration(value)
        return value


class WorkerConfig(_Strict):
    lease_seconds: float = Field(30.0, gt=0)
    max_active_shards: int = Field(8, ge=1)
    max_batches_in_flight: int = Field(
        256, ge=1, description="batches one process works on at once"
    )
    poll_seconds: float = Field(0.5, gt=0)
    segment_lines: int = Field(1000, ge=1)
    segment_seconds: float = Field(2.0, gt=0)
    sweep_seconds: float = Field(30.0, gt=0)
    orphan_sweep_seconds: float = Field(
        3600.0, gt=0, description="how often to look for blobs a crashed process left behind"
    )
    orphan_grace_seconds: float = Field(
        3600.0, ge=0, description="an uncommitted segment blob younger than this is left alone"
    )
    cancel_grace_seconds: float = Field(60.0, ge=0)
    route_probe_seconds: float = Field(
        30.0,
        gt=0,
        description="while an upstream refuses a route (401/403/404), one request probes it this often",
    )
    retry_base_seconds: float = Field(0.5, gt=0)
    retry_max_seconds: float = Field(30.0, gt=0)
    # Webhook deliveries (runner/webhooks.py): a failed attempt is retried after base, 2x base,
    # 4x base ... (with jitter) up to max, for retry_window seconds after the event.
    webhook_retry_base_seconds: float = Field(5.0, gt=0)
    webhook_retry_max_seconds: float = Field(3600.0, gt=0)
    webhook_retry_window_seconds: float = Field(72 * 3600.0, gt=0)
    webhook_timeout_seconds: float = Field(
        10.0, gt=0, description="one delivery attempt, connect to last byte"
    )


class ServerConfig(_Strict):
    """The HTTP front door: what one client may cost the server before it is cut off."""

    header_timeout: float = Field(
        10.0, gt=0, description="seconds a request's headers may take to arrive in full"
    )
    read_timeout: float = Field(
        60.0, gt=0, description="seconds a request body may go without sending a byte"
    )
    keep_alive_timeout: float = Field(
        5.0, gt=0, description="seconds an idle keep-alive connection is kept open"
    )
    max_connections: int = Field(
        1000, ge=1, description="connections held at once; more are closed on arrival"
    )
    max_json_body_bytes: int = Field(
        1024 * 1024, ge=1024, description="largest JSON request body (uploads have their own limit)"
    )
    public_url: str | None = Field(
        None,
        description="this server's URL as clients reach it (behind a proxy); message batches' "
        "results_url starts with it (default: the URL of the request)",
    )

    @field_validator("public_url")
    @classmethod
    def _no_trailing_slash(cls, value: str | None) -> str | None:
        return value.rstrip("/") if value else value


def _webhook_secret(value: str) -> str:
    """Standard Webhooks' form: 'whsec_' and the base64 of at least 24 random bytes."""
    how = (
        'make one with: python -c "import base64, os; '
        "print('whsec_' + base64.b64encode(os.urandom(32)).decode())\""
    )
    if not value.startswith("whsec_"):
        raise ValueError(f"a webhook secret must look like 'whsec_<base64>'; {how}")
    try:
        key = base64.b64decode(value[6:], validate=True)
    except (binascii.Error, ValueError):
        raise ValueError(f"the part after 'whsec_' is not valid base64; {how}") from None
    if len(key) < 24:
        raise ValueError(
            f"a webhook secret needs at least 24 bytes, this one has {len(key)}; {how}"
        )
    return value


def _url_problem(url: str) -> str | None:
    """Why `url` cannot be a webhook target (None: it can): http(s), a host, no credentials."""
    from urllib.parse import urlsplit

    if len(url) > 2048 or not url.isascii() or any(c.isspace() or ord(c) < 32 for c in url):
        return "must be at most 2048 printable ASCII characters (punycode the host)"
    try:
        parts = urlsplit(url)
        parts.port  # noqa: B018 - raises on a port that is not a number or out of range
    except ValueError:
        return "is not a valid URL"
    if parts.scheme not in ("http", "https"):
        return "must start with https:// or http://"
    if "@" in parts.netloc:
        return "must not carry credentials (user:password@)"
    host = webhook_host(url)
    if not host:
        return "has no host"
    if _ip(host) is None and not _HOST_NAME.fullmatch(host):
        return "has an invalid host name"
    return None


def webhook_host(url: str) -> str:
    """The URL's host as allowlists compare it: lower case, IPv6 without brackets."""
    from urllib.parse import urlsplit

    return (urlsplit(url).hostname or "").lower().rstrip(".")


WebhookEvent = Literal["batch.completed", "batch.failed", "batch.expired", "batch.cancelled"]
assert set(WebhookEvent.__args__) == set(WEBHOOK_EVENTS)  # type: ignore[attr-defined]


class WebhookEndpoint(_Strict):
    """One `[[webhooks]]` entry: where the events of (some) batches go, signed with `secret`."""

    url: str
    secret: str = Field(description="Standard Webhooks secret: 'whsec_<base64>'")
    events: list[WebhookEvent] = Field(
        default_factory=lambda: list(WEBHOOK_EVENTS), min_length=1, description="default: all"
    )
    projects: list[str] | None = Field(None, description="default: every project")

    @field_validator("url")
    @classmethod
    def _url(cls, value: str) -> str:
        problem = _url_problem(value)
        if problem:
            raise ValueError(f"webhook url {value!r} {problem}")
        return value

    @field_validator("secret")
    @classmethod
    def _secret(cls, value: str) -> str:
        return _webhook_secret(value)

    def wants(self, event_type: str, project: str) -> bool:
        return event_type in self.events and (self.projects is None or project in self.projects)


class BatchWebhooks(_Strict):
    """`[batch_webhooks]`: which per-batch `webhook_url`s a create may ask for, and their secret."""

    secret: str | None = Field(None, description="signs every per-batch delivery: 'whsec_<base64>'")
    allowed_hosts: list[str] = Field(
        default_factory=list,
        description="host names a per-batch URL may point at: 'hooks.example.com' exactly, or "
        "'*.example.com' for any subdomain; IP addresses only when listed exactly; empty: none",
    )

    @field_validator("secret")
    @classmethod
    def _secret(cls, value: str | None) -> str | None:
        return None if value is None else _webhook_secret(value)

    @field_validator("allowed_hosts")
    @classmethod
    def _hosts(cls, value: list[str]) -> list[str]:
        hosts = []
        for entry in value:
            name = entry.strip().lower().rstrip(".")
            address = _ip(name.strip("[]"))
            if address is not None:
                hosts.append(str(address))
                continue
            bare = name[2:] if name.startswith("*.") else name
            if not _HOST_NAME.fullmatch(bare):
                raise ValueError(
                    f"allowed_hosts entry {entry!r}: use a host name ('hooks.example.com'), "
                    "'*.example.com' (any subdomain), or an IP address"
                )
            hosts.append(name)
        return hosts

    @model_validator(mode="after")
    def _needs_secret(self) -> BatchWebhooks:
        if self.allowed_hosts and self.secret is None:
            raise ValueError("[batch_webhooks] allowed_hosts needs a secret to sign deliveries")
        return self

    def url_problem(self, url: str) -> str | None:
        """Why a create may not use `url` as its webhook_url (None: it may)."""
        problem = _url_problem(url)
        if problem:
            return problem
        if not self.allowed_hosts:
            return "is not accepted: this server allows no per-batch webhook URLs"
        host = webhook_host(url)
        address = _ip(host)
        for allowed in self.allowed_hosts:
            if address is not None:
                if _ip(allowed) == address:  # IP literals: only when listed exactly
                    return None
            elif allowed.startswith("*."):
                if host.endswith(allowed[1:]):  # a subdomain, not the domain itself
                    return None
            elif host == allowed:
                return None
        return f"is not accepted: host {host!r} is not in this server's allowed_hosts"


def _ip(host: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    try:
        return ipaddress.ip_address(host)
    except ValueError:
        return None


class Config(_Strict):
    models: list[ModelRoute] = Field(default_factory=list)
    auth: AuthConfig = Field(default_factory=AuthConfig)
    currency: str = Field("USD", min_length=1, max_length=8, description="one for the server")
    projects: dict[str, ProjectLimits] = Field(default_factory=dict)
    server: ServerConfig = Field(default_factory=ServerConfig)
    batches: BatchLimits = Field(default_factory=BatchLimits)
    message_batches: MessageBatchLimits = Field(default_factory=MessageBatchLimits)
    worker: WorkerConfig = Field(default_factory=WorkerConfig)
    database_url: str | None = None
    storage_url: str | None = Field(None, description="s3://bucket/prefix; default: DATA_DIR/blobs")
    storage_endpoint_url: str | None = Field(
        None, description="S3-compatible endpoint (MinIO, Ceph...)"
    )
    storage_region: str | None = None
    include_default_models: bool = Field(
        True,
        description="serve the bundled models too; a configured route of the same name replaces one",
    )
    webhooks: list[WebhookEndpoint] = Field(
        default_factory=list, description="where batch events are delivered"
    )
    batch_webhooks: BatchWebhooks = Field(default_factory=BatchWebhooks)

    def resolved_database_url(self) -> str | None:
        """The configuration's database_url, else LOWTIDE_DATABASE_URL, else None (SQLite)."""
        return self.database_url or os.environ.get("LOWTIDE_DATABASE_URL") or None

    def resolved_storage_url(self) -> str | None:
        """The configuration's storage_url, else LOWTIDE_STORAGE_URL, else None (local folder)."""
        return self.storage_url or os.environ.get("LOWTIDE_STORAGE_URL") or None

    def routes(self) -> list[ModelRoute]:
        """Configured routes plus the built-in ones they do not replace."""
        if not self.include_default_models:
            return list(self.models)
        configured = {route.name for route in self.models}
        return [*self.models, *(r for r in default_routes() if r.name not in configured)]


def default_routes() -> list[ModelRoute]:
    """What a fresh install serves with no configuration at all: two small CPU models, and echo."""
    return [
        ModelRoute(name="SmolLM2-135M-Instruct", engine="llamacpp", max_concurrency=64),
        ModelRoute(name="all-MiniLM-L6-v2", engine="embeddings", max_concurrency=256),
        ModelRoute(name="lowtide-echo", engine="echo", max_concurrency=1024),
    ]


def load_config(path: str | Path | None) -> Config:
    if path is None:
        return Config()
    with open(path, "rb") as fh:
        data = tomllib.load(fh)
    return Config.model_validate(data)

"""HTTP client for vLLM OpenAI-compatible servers: the only code that talks to serving pods.

Endpoints used: ``/v1/models``, ``/v1/load_lora_adapter`` and ``/v1/unload_lora_adapter``
(runtime LoRA updating, ``VLLM_ALLOW_RUNTIME_LORA_UPDATING=1`` on the server),
``/v1/chat/completions`` and ``/v1/completions`` (smoke requests) and ``/metrics``
(Prometheus text).

A serving pod runs the tenant's image, so every answer is treated as hostile:

- redirects are never followed (a 3xx is an error), so a pod cannot make the operator
  send requests, its API key included, to another address;
- bodies are read up to a bound; an error keeps only the ``message`` field of vLLM's JSON
  error, stripped of control characters and cut to :data:`REASON_MAX_CHARS`; nothing
  else of a reply reaches logs, events or status;
- the API key (``Authorization: Bearer``) goes only to ``/v1`` routes and never into a
  message or a log line.

Errors carry a :class:`VllmErrorKind`, decided from vLLM's status code *and* message:
vLLM answers the same adapter problem with 400 up to 0.11 and with 500 from 0.20 on.
"""

from __future__ import annotations

import json
import logging
import math
import time
import unicodedata
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any

import aiohttp
from prometheus_client.parser import text_string_to_metric_families

from ..planners.adapterdeployment import MetricsSample, SmokeResult

logger = logging.getLogger(__name__)

DEFAULT_TIMEOUT_SECONDS = 10.0
SMOKE_TIMEOUT_SECONDS = 60.0
CHAT_HANDLER = "/v1/chat/completions"
COMPLETIONS_HANDLER = "/v1/completions"
INFERENCE_HANDLERS = (CHAT_HANDLER, COMPLETIONS_HANDLER)
LOAD_ROUTE = "/v1/load_lora_adapter"
UNLOAD_ROUTE = "/v1/unload_lora_adapter"
# vLLM's bucket bounds for vllm:e2e_request_latency_seconds.
VLLM_LATENCY_BUCKETS = (
    0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0, 60.0,
    120.0, 240.0, 480.0, 960.0, 1920.0, 7680.0,
)  # fmt: skip
# vLLM's bucket bounds for vllm:request_time_per_output_token_seconds (0.11 to 0.34).
VLLM_TPOT_BUCKETS = (
    0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5,
    10.0, 20.0, 40.0, 80.0,
)  # fmt: skip
# What a serving pod's reason may take in a condition, event or log line.
REASON_MAX_CHARS = 120
# Bodies are read up to these sizes: enough for vLLM's answers, not for a flood.
MAX_ERROR_BODY_BYTES = 16 * 1024
MAX_ANSWER_BYTES = 1024 * 1024
MAX_LISTING_BYTES = 8 * 1024 * 1024  # /v1/models and /metrics
# vLLM's engine wraps every failed utility call in this prefix; the rest is the reason.
_ENGINE_CALL_PREFIX = "call to add_lora method failed:"


class VllmErrorKind(StrEnum):
    """What went wrong, as far as the operator needs to act on it."""

    UNREACHABLE = "Unreachable"  # no answer: connection refused, reset, timeout
    SERVER_ERROR = "ServerError"  # 5xx (or 408/429) without a reason the operator knows
    REDIRECT = "Redirect"  # a 3xx: refused, never followed
    UNAUTHORIZED = "Unauthorized"  # 401/403: the API key is missing or wrong
    BAD_RESPONSE = "BadResponse"  # an answer that is not what vLLM sends
    RUNTIME_UPDATING_DISABLED = "RuntimeUpdatingDisabled"  # no LoRA load/unload routes
    LORA_NOT_ENABLED = "LoraNotEnabled"  # server started without --enable-lora
    RANK_TOO_HIGH = "RankTooHigh"  # adapter rank above --max-lora-rank
    ADAPTER_UNSUPPORTED = "AdapterUnsupported"  # DoRA, modules_to_save, bias, extra vocab
    ADAPTER_NOT_FOUND = "AdapterNotFound"  # nothing at lora_path
    ALREADY_LOADED = "AlreadyLoaded"  # a load of a name the server already has
    NOT_LOADED = "NotLoaded"  # an unload of a name the server does not have
    MODEL_NOT_FOUND = "ModelNotFound"  # a request for a model name the server lacks
    NO_CHAT_TEMPLATE = "NoChatTemplate"  # chat request to a model without a chat template
    WRONG_MODEL = "WrongModel"  # the answer came from another model than the one asked
    REJECTED = "Rejected"  # any other 4xx

    @property
    def transient(self) -> bool:
        """Worth retrying: the same request may succeed later."""
        return self in _TRANSIENT

    @property
    def adapter_fault(self) -> bool:
        """This server cannot take this adapter as configured: retrying cannot help."""
        return self in _ADAPTER_FAULTS


_TRANSIENT = frozenset({VllmErrorKind.UNREACHABLE, VllmErrorKind.SERVER_ERROR})
_ADAPTER_FAULTS = frozenset(
    {
        VllmErrorKind.LORA_NOT_ENABLED,
        VllmErrorKind.RANK_TOO_HIGH,
        VllmErrorKind.ADAPTER_UNSUPPORTED,
        VllmErrorKind.ADAPTER_NOT_FOUND,
        VllmErrorKind.REJECTED,
    }
)

# Substrings of vLLM's messages (lower case) and what they mean; each from vLLM's source:
# vllm/lora/peft_helper.py (validate_legal, _validate_features),
# vllm/v1/worker/lora_model_runner_mixin.py (_ensure_lora_enabled),
# vllm/lora/worker_manager.py and vllm/exceptions.py (LoRAAdapterNotFoundError),
# vllm/entrypoints/openai/serving_models.py, models/serving.py (load/unload checks),
# vllm/entrypoints/chat_utils.py, renderers/hf.py (no chat template).
_KNOWN_MESSAGES: tuple[tuple[str, VllmErrorKind], ...] = (
    ("is greater than max_lora_rank", VllmErrorKind.RANK_TOO_HIGH),
    ("lora is not enabled", VllmErrorKind.LORA_NOT_ENABLED),
    ("does not yet support dora", VllmErrorKind.ADAPTER_UNSUPPORTED),
    ("only supports modules_to_save", VllmErrorKind.ADAPTER_UNSUPPORTED),
    ("adapter bias", VllmErrorKind.ADAPTER_UNSUPPORTED),
    ("lora added vocab size", VllmErrorKind.ADAPTER_UNSUPPORTED),
    ("no adapter found", VllmErrorKind.ADAPTER_NOT_FOUND),
    ("has already been loaded", VllmErrorKind.ALREADY_LOADED),
    ("conflicts with a served base model", VllmErrorKind.REJECTED),
    ("cannot be found", VllmErrorKind.NOT_LOADED),
    ("does not exist", VllmErrorKind.MODEL_NOT_FOUND),
    ("must provide a chat template", VllmErrorKind.NO_CHAT_TEMPLATE),
)


def sanitize_reason(text: str, limit: int = REASON_MAX_CHARS) -> str:
    """One short line: control and format characters dropped, whitespace collapsed, cut."""
    kept = "".join(" " if unicodedata.category(ch).startswith("C") else ch for ch in text)
    line = " ".join(kept.split())
    return line if len(line) <= limit else line[: limit - 1] + "…"


# vLLM's middlewares answer with a bare string under "error" instead of an ErrorResponse
# (ScalingMiddleware's 503 while an elastic-EP scale-up runs: the same text in 0.11, 0.20 and
# 0.34). Only these exact texts are shown: any other bare string could be anything a pod sends.
BARE_ERROR_TEXTS = frozenset({"The model is currently scaling. Please try again later."})


def error_message(body: str) -> str:
    """The ``error.message`` of vLLM's JSON error body, a known middleware text, or ""."""
    try:
        obj = json.loads(body)
    except ValueError:
        return ""
    err = obj.get("error") if isinstance(obj, dict) else None
    if isinstance(err, str):
        return err if err in BARE_ERROR_TEXTS else ""
    message = err.get("message") if isinstance(err, dict) else None
    return message if isinstance(message, str) else ""


def classify(status: int, message: str, path: str) -> VllmErrorKind:
    """What an error answer means, from the status code and vLLM's message."""
    if 300 <= status < 400:
        return VllmErrorKind.REDIRECT
    if status in (401, 403):
        return VllmErrorKind.UNAUTHORIZED
    lowered = message.lower()
    for needle, kind in _KNOWN_MESSAGES:
        if needle in lowered:
            return kind
    if status == 404 and not message and path in (LOAD_ROUTE, UNLOAD_ROUTE):
        # The routes exist only with VLLM_ALLOW_RUNTIME_LORA_UPDATING on; otherwise the
        # web framework answers a bare 404 ({"detail": "Not Found"}).
        return VllmErrorKind.RUNTIME_UPDATING_DISABLED
    if status >= 500 or status in (408, 429):
        return VllmErrorKind.SERVER_ERROR
    return VllmErrorKind.REJECTED


def _reason(kind: VllmErrorKind, message: str, key_sent: bool) -> str:
    """The short text an error carries: vLLM's reason where it gave one, else the kind's."""
    if kind is VllmErrorKind.UNAUTHORIZED:
        return (
            "the server refused the API key"
            if key_sent
            else "the server requires an API key (--api-key or VLLM_API_KEY)"
        )
    if kind is VllmErrorKind.REDIRECT:
        return "the server answered with a redirect; redirects are not followed"
    if kind is VllmErrorKind.RUNTIME_UPDATING_DISABLED:
        return "runtime LoRA updating is off (VLLM_ALLOW_RUNTIME_LORA_UPDATING is not 1/true)"
    text = message.strip()
    if text.lower().startswith(_ENGINE_CALL_PREFIX):
        text = text[len(_ENGINE_CALL_PREFIX) :]
    return sanitize_reason(text) or "no reason given"


class VllmError(RuntimeError):
    """A serving pod answered with an error (or did not answer).

    ``message`` is short and sanitized (safe for status, events and logs); ``kind`` says
    what it means; ``status`` is the HTTP status, None when no answer came.
    """

    def __init__(
        self,
        endpoint: str,
        status: int | None,
        message: str,
        kind: VllmErrorKind | None = None,
        path: str = "",
    ) -> None:
        if kind is None:
            kind = VllmErrorKind.UNREACHABLE if status is None else classify(status, "", path)
        where = "unreachable" if status is None else f"HTTP {status}"
        super().__init__(f"{endpoint}{path}: {where}: {message}")
        self.endpoint = endpoint
        self.path = path
        self.status = status
        self.message = message
        self.kind = kind

    @property
    def permanent(self) -> bool:
        """Retrying the same request against the same server cannot succeed."""
        return not self.kind.transient


@dataclass(frozen=True)
class SmokeOutcome(SmokeResult):
    """A smoke request's result, with what the operator learnt from it."""

    kind: VllmErrorKind | None = None  # None when it succeeded
    handler: str = CHAT_HANDLER  # the route that answered last
    model: str | None = None  # the ``model`` field of the answer (sanitized)


@dataclass(frozen=True)
class LoraRequestsInfo:
    """``vllm:lora_requests_info``: which adapters the engine scheduled.

    vLLM sets one gauge sample per (running, waiting) combination to the current time on
    every engine step, so the newest sample is the present and all samples together are
    every adapter that was scheduled since the server started.
    """

    max_lora: int | None = None
    running: frozenset[str] = frozenset()
    waiting: frozenset[str] = frozenset()
    seen: frozenset[str] = field(default_factory=frozenset)


@dataclass(frozen=True)
class _Reply:
    status: int
    body: str


class _BodyTooLarge(Exception):
    pass


async def _read_bounded(resp: aiohttp.ClientResponse, limit: int) -> bytes:
    chunks: list[bytes] = []
    size = 0
    while True:
        chunk = await resp.content.read(min(64 * 1024, limit + 1 - size))
        if not chunk:
            return b"".join(chunks)
        chunks.append(chunk)
        size += len(chunk)
        if size > limit:
            raise _BodyTooLarge


class VllmClient:
    """Calls one server at a time; ``endpoint`` is ``http://host:port``.

    ``api_key`` is sent as ``Authorization: Bearer`` on ``/v1`` routes (vLLM's
    ``--api-key`` / ``VLLM_API_KEY`` guard exactly those; ``/metrics`` stays open).
    :meth:`with_api_key` gives a client for another server sharing the same session.
    """

    def __init__(
        self,
        session: aiohttp.ClientSession,
        timeout: float = DEFAULT_TIMEOUT_SECONDS,
        api_key: str | None = None,
    ) -> None:
        self._session = session
        self._timeout_seconds = timeout
        self._timeout = aiohttp.ClientTimeout(total=timeout)
        self._api_key = api_key or None
        # Endpoints whose model has no chat template: smoke requests use /v1/completions.
        self._completions_only: set[str] = set()

    def __repr__(self) -> str:  # never the key
        return f"VllmClient(timeout={self._timeout_seconds}, api_key={'set' if self._api_key else None})"

    def with_api_key(self, api_key: str | None) -> VllmClient:
        """The same client (session, timeout) sending ``api_key`` instead."""
        other = VllmClient(self._session, self._timeout_seconds, api_key)
        other._completions_only = self._completions_only
        return other

    # ---------------------------------------------------------- transport

    async def _request(
        self,
        method: str,
        endpoint: str,
        path: str,
        *,
        json_body: dict[str, Any] | None = None,
        timeout: aiohttp.ClientTimeout | None = None,
        limit: int = MAX_LISTING_BYTES,
    ) -> _Reply:
        """One request; 2xx come back, anything else raises :class:`VllmError`."""
        url = endpoint.rstrip("/") + path
        headers: dict[str, str] = {}
        if self._api_key and path.startswith("/v1"):
            headers["Authorization"] = f"Bearer {self._api_key}"
        try:
            async with self._session.request(
                method,
                url,
                json=json_body,
                headers=headers,
                timeout=timeout or self._timeout,
                allow_redirects=False,
            ) as resp:
                status = resp.status
                if 300 <= status < 400:  # the body is not even read
                    raise self._error(endpoint, path, status, "")
                if status >= 400:
                    try:
                        raw = await _read_bounded(resp, MAX_ERROR_BODY_BYTES)
                    except _BodyTooLarge:
                        raw = b""  # a flood is no reason; the status still is
                    text = raw.decode("utf-8", errors="replace")
                    raise self._error(endpoint, path, status, error_message(text))
                try:
                    raw = await _read_bounded(resp, limit)
                except _BodyTooLarge:
                    raise VllmError(
                        endpoint, status, f"the answer is larger than {limit} bytes",
                        VllmErrorKind.BAD_RESPONSE, path,
                    ) from None  # fmt: skip
                return _Reply(status, raw.decode("utf-8", errors="replace"))
        except (aiohttp.ClientError, TimeoutError, OSError) as exc:
            raise VllmError(
                endpoint, None, f"{type(exc).__name__} on {path}", VllmErrorKind.UNREACHABLE, path
            ) from None

    def _error(self, endpoint: str, path: str, status: int, message: str) -> VllmError:
        kind = classify(status, message, path)
        err = VllmError(
            endpoint, status, _reason(kind, message, self._api_key is not None), kind, path
        )
        logger.debug("%s%s: HTTP %s (%s)", endpoint, path, status, kind.value)
        return err

    @staticmethod
    def _json(endpoint: str, path: str, reply: _Reply) -> Any:
        try:
            return json.loads(reply.body)
        except ValueError:
            raise VllmError(
                endpoint, reply.status, "the answer is not JSON", VllmErrorKind.BAD_RESPONSE, path
            ) from None

    # ---------------------------------------------------------- adapters

    async def loaded_adapters(self, endpoint: str) -> dict[str, str]:
        """LoRA adapters the server has: ``{name: path}`` (entries with a parent model)."""
        path = "/v1/models"
        obj = self._json(endpoint, path, await self._request("GET", endpoint, path))
        data = obj.get("data") if isinstance(obj, dict) else None
        if not isinstance(data, list):
            raise VllmError(
                endpoint, 200, "the model list has no data", VllmErrorKind.BAD_RESPONSE, path
            )
        return {
            str(m["id"]): str(m.get("root") or "")
            for m in data
            if isinstance(m, dict) and m.get("parent") and "id" in m
        }

    async def load_adapter(
        self, endpoint: str, name: str, path: str, *, replace: bool = False
    ) -> None:
        """Load ``name`` from ``path``.

        ``replace``: the server may already have ``name`` (a reload). vLLM >= 0.20 swaps
        it in place (``load_inplace``), so it keeps answering throughout; older servers
        ignore that field and refuse a loaded name, so it is unloaded and loaded again.
        """
        body: dict[str, Any] = {"lora_name": name, "lora_path": path}
        if replace:
            body["load_inplace"] = True
        try:
            await self._request("POST", endpoint, LOAD_ROUTE, json_body=body)
        except VllmError as exc:
            if not (replace and exc.kind is VllmErrorKind.ALREADY_LOADED):
                raise
            await self.unload_adapter(endpoint, name)
            await self._request("POST", endpoint, LOAD_ROUTE, json_body=body)

    async def unload_adapter(self, endpoint: str, name: str) -> None:
        """Unload ``name``; a server that does not have it is fine."""
        try:
            await self._request("POST", endpoint, UNLOAD_ROUTE, json_body={"lora_name": name})
        except VllmError as exc:
            if exc.kind is not VllmErrorKind.NOT_LOADED:
                raise

    # ---------------------------------------------------------- smoke requests

    async def smoke(
        self, endpoint: str, model: str, prompt: str, max_tokens: int = 16
    ) -> SmokeOutcome:
        """One request to ``model`` (the adapter name) that must be answered by it.

        Chat first; a model without a chat template answers 400, and then (and for
        later calls to that endpoint) a plain completion. Never raises.
        """
        if endpoint not in self._completions_only:
            outcome = await self._smoke_once(endpoint, CHAT_HANDLER, model, prompt, max_tokens)
            if outcome.kind is not VllmErrorKind.NO_CHAT_TEMPLATE:
                return outcome
            if len(self._completions_only) > 4096:  # pod IPs come and go
                self._completions_only.clear()
            self._completions_only.add(endpoint)
        return await self._smoke_once(endpoint, COMPLETIONS_HANDLER, model, prompt, max_tokens)

    async def _smoke_once(
        self, endpoint: str, handler: str, model: str, prompt: str, max_tokens: int
    ) -> SmokeOutcome:
        body: dict[str, Any] = {"model": model, "max_tokens": max_tokens, "temperature": 0}
        if handler == CHAT_HANDLER:
            body["messages"] = [{"role": "user", "content": prompt}]
        else:
            body["prompt"] = prompt
        started = time.monotonic()

        def failed(error: str, status: int | None, kind: VllmErrorKind) -> SmokeOutcome:
            elapsed = (time.monotonic() - started) * 1000
            return SmokeOutcome(False, elapsed, error, status, kind=kind, handler=handler)

        try:
            reply = await self._request(
                "POST", endpoint, handler, json_body=body,
                timeout=aiohttp.ClientTimeout(total=SMOKE_TIMEOUT_SECONDS),
                limit=MAX_ANSWER_BYTES,
            )  # fmt: skip
            answer = self._json(endpoint, handler, reply)
        except VllmError as exc:
            where = f"HTTP {exc.status}" if exc.status is not None else "unreachable"
            return failed(f"{where}: {exc.message}", exc.status, exc.kind)
        elapsed = (time.monotonic() - started) * 1000
        choices = answer.get("choices") if isinstance(answer, dict) else None
        if not choices:
            return failed("the answer has no choices", reply.status, VllmErrorKind.BAD_RESPONSE)
        answered = answer.get("model")
        shown = sanitize_reason(str(answered), 60) if answered is not None else None
        if answered != model:
            # vLLM names the adapter that served a request in ``model``; anything else
            # means the adapter did not answer (e.g. a base model under its name).
            return failed(
                f"the answer came from model {shown!r}, not {model!r}",
                reply.status,
                VllmErrorKind.WRONG_MODEL,
            )
        return SmokeOutcome(True, elapsed, status=reply.status, handler=handler, model=shown)

    # ---------------------------------------------------------- metrics

    async def metrics_text(self, endpoint: str) -> str:
        """The ``/metrics`` page (bounded)."""
        return (await self._request("GET", endpoint, "/metrics")).body

    async def metrics(self, endpoint: str) -> MetricsSample:
        return parse_metrics(await self.metrics_text(endpoint))

    async def lora_requests_info(self, endpoint: str) -> LoraRequestsInfo:
        """Which adapters the server's engine scheduled (``vllm:lora_requests_info``)."""
        return parse_lora_requests_info(await self.metrics_text(endpoint))


def parse_metrics(text: str) -> MetricsSample:
    """Counters the canary analysis needs, from a vLLM ``/metrics`` page.

    - requests and errors: ``http_requests_total`` of the inference handlers (vLLM's HTTP
      instrumentation, status grouped as ``2xx``/``4xx``/``5xx``); errors are ``5xx``.
      Servers without it fall back to ``vllm:request_success_total`` as the request count.
    - successes: ``vllm:request_success_total`` summed over ``finished_reason``.
    - latency: ``vllm:e2e_request_latency_seconds`` buckets, summed over label sets.
    - generation speed: ``vllm:request_generation_tokens`` (sum and count) and
      ``vllm:request_decode_time_seconds`` (sum), summed over label sets. Every generation
      from 0.8.5 to 0.34 observes both once per finished request with these names
      (vllm/engine/metrics.py, vllm/v1/metrics/loggers.py); the per-token histograms
      (``vllm:time_per_output_token_seconds``, gone after 0.11, and
      ``vllm:request_time_per_output_token_seconds``, from 0.11) are not needed.
    """
    sample = MetricsSample()
    http_seen = False
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            name, labels, value = s.name, s.labels, float(s.value)
            if math.isnan(value) or value < 0:  # no counter or histogram of vLLM goes below 0
                continue
            if name == "http_requests_total" and labels.get("handler") in INFERENCE_HANDLERS:
                http_seen = True
                sample.requests += value
                if str(labels.get("status", "")).startswith("5"):
                    sample.errors += value
            elif name == "vllm:request_success_total":
                sample.successes += value
            elif name == "vllm:e2e_request_latency_seconds_bucket":
                le = float(labels["le"])
                sample.latency_buckets[le] = sample.latency_buckets.get(le, 0.0) + value
            elif name == "vllm:e2e_request_latency_seconds_count":
                sample.latency_count += value
            elif name == "vllm:request_generation_tokens_sum":
                sample.generation_tokens += value
            elif name == "vllm:request_generation_tokens_count":
                sample.generation_requests += value
            elif name == "vllm:request_decode_time_seconds_sum":
                sample.decode_seconds += value
    if not http_seen:
        sample.requests = sample.successes
    return sample


def _names(label: str | None) -> frozenset[str]:
    return frozenset(n for n in (label or "").split(",") if n)


def parse_lora_requests_info(text: str) -> LoraRequestsInfo:
    """``vllm:lora_requests_info`` from a ``/metrics`` page (empty when LoRA is off)."""
    newest: tuple[float, dict[str, str]] | None = None
    seen: set[str] = set()
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            if s.name != "vllm:lora_requests_info":
                continue
            seen |= _names(s.labels.get("running_lora_adapters"))
            seen |= _names(s.labels.get("waiting_lora_adapters"))
            if newest is None or float(s.value) > newest[0]:
                newest = (float(s.value), dict(s.labels))
    if newest is None:
        return LoraRequestsInfo()
    labels = newest[1]
    try:
        max_lora: int | None = int(labels.get("max_lora", ""))
    except ValueError:
        max_lora = None
    return LoraRequestsInfo(
        max_lora=max_lora,
        running=_names(labels.get("running_lora_adapters")),
        waiting=_names(labels.get("waiting_lora_adapters")),
        seen=frozenset(seen),
    )

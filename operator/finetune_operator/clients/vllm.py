"""HTTP client for vLLM OpenAI-compatible servers: the only code that talks to serving pods.

Endpoints used: ``/v1/models``, ``/v1/load_lora_adapter`` and ``/v1/unload_lora_adapter``
(runtime LoRA updating, ``VLLM_ALLOW_RUNTIME_LORA_UPDATING=True`` on the server),
``/v1/chat/completions`` (smoke requests) and ``/metrics`` (Prometheus text).
Every call has a timeout; request and response bodies are never logged.
"""

from __future__ import annotations

import json
import logging
import math
import time
from typing import Any

import aiohttp
from prometheus_client.parser import text_string_to_metric_families

from ..planners.adapterdeployment import MetricsSample, SmokeResult

logger = logging.getLogger(__name__)

DEFAULT_TIMEOUT_SECONDS = 10.0
SMOKE_TIMEOUT_SECONDS = 60.0
INFERENCE_HANDLERS = ("/v1/chat/completions", "/v1/completions")
# vLLM's bucket bounds for vllm:e2e_request_latency_seconds.
VLLM_LATENCY_BUCKETS = (
    0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0, 60.0,
    120.0, 240.0, 480.0, 960.0, 1920.0, 7680.0,
)  # fmt: skip
_ERROR_TEXT_MAX = 300


class VllmError(RuntimeError):
    """A serving pod answered with an error (or did not answer)."""

    def __init__(self, endpoint: str, status: int | None, message: str) -> None:
        super().__init__(
            f"{endpoint}: {'HTTP ' + str(status) if status else 'unreachable'}: {message}"
        )
        self.status = status
        self.message = message


def _short(text: str) -> str:
    text = " ".join(text.split())
    return text if len(text) <= _ERROR_TEXT_MAX else text[: _ERROR_TEXT_MAX - 1] + "…"


def _error_message(body: str) -> str:
    """The server's error message (OpenAI error shape or plain text), shortened."""
    try:
        obj = json.loads(body)
    except ValueError:
        return _short(body)
    if isinstance(obj, dict):
        err = obj.get("error", obj)
        if isinstance(err, dict) and err.get("message"):
            return _short(str(err["message"]))
        if isinstance(obj.get("message"), str):
            return _short(obj["message"])
    return _short(body)


class VllmClient:
    """Calls one server at a time; ``endpoint`` is ``http://host:port``."""

    def __init__(
        self,
        session: aiohttp.ClientSession,
        timeout: float = DEFAULT_TIMEOUT_SECONDS,
        api_key: str | None = None,
    ) -> None:
        self._session = session
        self._timeout = aiohttp.ClientTimeout(total=timeout)
        self._headers = {"Authorization": f"Bearer {api_key}"} if api_key else None

    async def _request(
        self,
        method: str,
        endpoint: str,
        path: str,
        *,
        json_body: dict[str, Any] | None = None,
        timeout: aiohttp.ClientTimeout | None = None,
    ) -> tuple[int, str]:
        url = endpoint.rstrip("/") + path
        try:
            async with self._session.request(
                method,
                url,
                json=json_body,
                timeout=timeout or self._timeout,
                headers=self._headers,
            ) as resp:
                return resp.status, await resp.text()
        except (aiohttp.ClientError, TimeoutError, OSError) as exc:
            raise VllmError(endpoint, None, f"{type(exc).__name__} on {path}") from exc

    async def loaded_adapters(self, endpoint: str) -> dict[str, str]:
        """LoRA adapters the server has: ``{name: path}`` (entries with a parent model)."""
        status, body = await self._request("GET", endpoint, "/v1/models")
        if status != 200:
            raise VllmError(endpoint, status, _error_message(body))
        data = json.loads(body).get("data") or []
        return {
            str(m["id"]): str(m.get("root") or "")
            for m in data
            if isinstance(m, dict) and m.get("parent")
        }

    async def load_adapter(self, endpoint: str, name: str, path: str) -> None:
        status, body = await self._request(
            "POST",
            endpoint,
            "/v1/load_lora_adapter",
            json_body={"lora_name": name, "lora_path": path},
        )
        if status != 200:
            raise VllmError(endpoint, status, _error_message(body))

    async def unload_adapter(self, endpoint: str, name: str) -> None:
        status, body = await self._request(
            "POST", endpoint, "/v1/unload_lora_adapter", json_body={"lora_name": name}
        )
        if status not in (200, 404):  # already gone is fine
            raise VllmError(endpoint, status, _error_message(body))

    async def smoke(
        self, endpoint: str, model: str, prompt: str, max_tokens: int = 16
    ) -> SmokeResult:
        """One chat completion against ``model`` (the adapter name); never raises."""
        started = time.monotonic()
        body = {
            "model": model,
            "messages": [{"role": "user", "content": prompt}],
            "max_tokens": max_tokens,
            "temperature": 0,
        }
        try:
            status, text = await self._request(
                "POST",
                endpoint,
                "/v1/chat/completions",
                json_body=body,
                timeout=aiohttp.ClientTimeout(total=SMOKE_TIMEOUT_SECONDS),
            )
        except VllmError as exc:
            return SmokeResult(False, (time.monotonic() - started) * 1000, str(exc))
        elapsed = (time.monotonic() - started) * 1000
        if status != 200:
            return SmokeResult(False, elapsed, f"HTTP {status}: {_error_message(text)}", status)
        try:
            choices = json.loads(text).get("choices") or []
        except ValueError:
            return SmokeResult(False, elapsed, "the answer is not JSON", status)
        if not choices:
            return SmokeResult(False, elapsed, "the answer has no choices", status)
        return SmokeResult(True, elapsed, status=status)

    async def metrics(self, endpoint: str) -> MetricsSample:
        status, body = await self._request("GET", endpoint, "/metrics")
        if status != 200:
            raise VllmError(endpoint, status, _error_message(body))
        return parse_metrics(body)


def parse_metrics(text: str) -> MetricsSample:
    """Counters the canary analysis needs, from a vLLM ``/metrics`` page.

    - requests and errors: ``http_requests_total`` of the inference handlers (vLLM's HTTP
      instrumentation, status grouped as ``2xx``/``4xx``/``5xx``); errors are ``5xx``.
      Servers without it fall back to ``vllm:request_success_total`` as the request count.
    - successes: ``vllm:request_success_total`` summed over ``finished_reason``.
    - latency: ``vllm:e2e_request_latency_seconds`` buckets, summed over label sets.
    """
    sample = MetricsSample()
    http_seen = False
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            name, labels, value = s.name, s.labels, float(s.value)
            if math.isnan(value):
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
    if not http_seen:
        sample.requests = sample.successes
    return sample

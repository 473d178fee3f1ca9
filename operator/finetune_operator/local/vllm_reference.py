"""A small vLLM-compatible OpenAI server, for tests and the embedded demo.

It speaks the parts of vLLM's HTTP API the operator uses, with vLLM's rules and metric
names:

- ``GET /v1/models``: the base model, then one entry per LoRA adapter (``parent`` set);
- ``POST /v1/load_lora_adapter`` / ``/v1/unload_lora_adapter`` (runtime LoRA updating);
- ``POST /v1/chat/completions`` with ``model`` = the base model or an adapter name;
- ``GET /metrics``: ``vllm:request_success_total{finished_reason}``,
  ``vllm:e2e_request_latency_seconds`` (vLLM's buckets), ``vllm:num_requests_running``,
  ``http_requests_total{handler,method,status}``;
- ``GET /health``.

Startup follows vLLM: every ``--lora-modules`` adapter is checked when the server
starts, and an adapter whose rank (``r`` in its ``adapter_config.json``) is above
``--max-lora-rank`` stops the server from starting. Failures can be injected: a share of
requests answered with HTTP 500, added latency, a crash.

Generation is pluggable: by default the answer is a deterministic echo; pass a
``generator`` (sync or async callable taking a :class:`GenerationRequest`) to answer
with a real model.
"""

from __future__ import annotations

import asyncio
import inspect
import json
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from aiohttp import web
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from .. import vllm_args
from ..clients.vllm import VLLM_LATENCY_BUCKETS


class ServerRefusedToStart(RuntimeError):
    """The configuration would stop vLLM at startup (the message is what vLLM reports)."""


@dataclass(frozen=True)
class GenerationRequest:
    model: str
    adapter_name: str | None
    adapter_path: str | None
    messages: list[dict[str, Any]]
    max_tokens: int


Generator = Callable[[GenerationRequest], "str | Awaitable[str]"]


def echo_generator(req: GenerationRequest) -> str:
    """Deterministic answer naming the model and repeating the last user message."""
    last = next(
        (str(m.get("content", "")) for m in reversed(req.messages) if m.get("role") == "user"), ""
    )
    words = f"[{req.model}] {last}".split()
    return " ".join(words[: max(1, req.max_tokens)])


@dataclass
class ReferenceConfig:
    """A server's configuration: what vLLM's flags say, plus injected failures."""

    model: str = "tiny-base"
    served_model_names: list[str] = field(default_factory=list)
    enable_lora: bool = True
    max_lora_rank: int = vllm_args.DEFAULT_MAX_LORA_RANK
    max_loras: int = vllm_args.DEFAULT_MAX_LORAS
    lora_modules: dict[str, str] = field(default_factory=dict)
    allow_runtime_lora_updating: bool = True
    error_rate: float = 0.0
    added_latency_seconds: float = 0.0

    @classmethod
    def from_command_line(cls, tokens: Sequence[str], **overrides: Any) -> ReferenceConfig:
        """The configuration a container command line (``vllm serve ...``) gives."""
        parsed = vllm_args.parse_tokens(list(tokens))
        if not parsed.is_openai_server:
            raise ServerRefusedToStart("not a vLLM OpenAI server command line")
        config = cls(
            model=parsed.model or "model",
            served_model_names=parsed.served_model_names,
            enable_lora=parsed.enable_lora,
            max_lora_rank=parsed.max_lora_rank,
            max_loras=parsed.max_loras,
            lora_modules={m.name: m.path for m in parsed.lora_modules},
        )
        return replace(config, **overrides)

    @property
    def base_name(self) -> str:
        return self.served_model_names[0] if self.served_model_names else self.model


def adapter_rank(path: str) -> int:
    """LoRA rank from ``adapter_config.json`` (``r``), as vLLM reads it."""
    config_file = Path(path) / "adapter_config.json"
    try:
        config = json.loads(config_file.read_text(encoding="utf-8"))
    except FileNotFoundError as exc:
        raise ValueError(f"No adapter found for {path}") from exc
    except ValueError as exc:
        raise ValueError(f"{config_file}: invalid adapter config: {exc}") from exc
    return int(config.get("r", 8))


class ReferenceServer:
    """One server instance. ``await start()`` binds it; ``await stop()`` or ``crash()`` ends it."""

    def __init__(self, config: ReferenceConfig, generator: Generator | None = None) -> None:
        self.config = config
        self.generator: Generator = generator or echo_generator
        self.adapters: dict[str, str] = {}
        self.port: int | None = None
        self._runner: web.AppRunner | None = None
        self._request_index = 0
        self.registry = CollectorRegistry()
        self._success = Counter(
            "vllm:request_success",
            "Count of successfully processed requests.",
            ["model_name", "finished_reason"],
            registry=self.registry,
        )
        self._latency = Histogram(
            "vllm:e2e_request_latency_seconds",
            "Histogram of end to end request latency in seconds.",
            ["model_name"],
            buckets=VLLM_LATENCY_BUCKETS,
            registry=self.registry,
        )
        self._running = Gauge(
            "vllm:num_requests_running",
            "Number of requests currently running.",
            ["model_name"],
            registry=self.registry,
        )
        self._http = Counter(
            "http_requests",
            "Total number of requests by method, status and handler.",
            ["handler", "method", "status"],
            registry=self.registry,
        )

    # ------------------------------------------------------------ lifecycle

    def check_startup(self) -> None:
        """Raise :class:`ServerRefusedToStart` where vLLM would not start."""
        cfg = self.config
        if cfg.lora_modules and not cfg.enable_lora:
            raise ServerRefusedToStart("--lora-modules requires --enable-lora")
        if cfg.max_lora_rank not in vllm_args.ALLOWED_MAX_LORA_RANKS:
            raise ServerRefusedToStart(
                f"argument --max-lora-rank: invalid choice: {cfg.max_lora_rank}"
            )
        for name, path in cfg.lora_modules.items():
            try:
                rank = adapter_rank(path)
            except ValueError as exc:
                raise ServerRefusedToStart(f"Loading lora {name} failed: {exc}") from exc
            if rank > cfg.max_lora_rank:
                raise ServerRefusedToStart(
                    f"LoRA rank {rank} is greater than max_lora_rank {cfg.max_lora_rank}."
                )

    async def start(self, host: str = "127.0.0.1", port: int = 0) -> int:
        self.check_startup()
        self.adapters = dict(self.config.lora_modules)
        app = web.Application()
        app.router.add_get("/health", self._health)
        app.router.add_get("/v1/models", self._models)
        app.router.add_post("/v1/load_lora_adapter", self._load)
        app.router.add_post("/v1/unload_lora_adapter", self._unload)
        app.router.add_post("/v1/chat/completions", self._chat)
        app.router.add_get("/metrics", self._metrics)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, host, port)
        await site.start()
        server = site._server
        assert server is not None
        self.port = int(server.sockets[0].getsockname()[1])  # type: ignore[attr-defined]
        return self.port

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    async def crash(self) -> None:
        """Stop answering at once, losing every runtime-loaded adapter (like a dead process)."""
        self.adapters = {}
        await self.stop()

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    # ------------------------------------------------------------ handlers

    def _count(self, handler: str, method: str, status: int) -> None:
        self._http.labels(handler, method, f"{status // 100}xx").inc()

    @staticmethod
    def _error(status: int, message: str, kind: str) -> web.Response:
        body = {"error": {"message": message, "type": kind, "code": status}}
        return web.json_response(body, status=status)

    async def _health(self, _: web.Request) -> web.Response:
        return web.Response(status=200)

    async def _models(self, _: web.Request) -> web.Response:
        base = self.config.base_name
        data: list[dict[str, Any]] = [
            {"id": base, "object": "model", "root": self.config.model, "parent": None}
        ]
        for name, path in self.adapters.items():
            data.append({"id": name, "object": "model", "root": path, "parent": base})
        return web.json_response({"object": "list", "data": data})

    async def _load(self, request: web.Request) -> web.Response:
        if not self.config.allow_runtime_lora_updating:
            return self._error(404, "Not Found", "NotFoundError")
        body = await request.json()
        name, path = str(body.get("lora_name", "")), str(body.get("lora_path", ""))
        if not name or not path:
            return self._error(
                400, "Both 'lora_name' and 'lora_path' must be provided.", "BadRequestError"
            )
        if name in self.adapters:
            return self._error(
                400, f"The lora adapter '{name}' has already been loaded.", "InvalidUserInput"
            )
        if not self.config.enable_lora:
            return self._error(400, "LoRA is not enabled (--enable-lora).", "BadRequestError")
        try:
            rank = adapter_rank(path)
        except ValueError as exc:
            return self._error(404, str(exc), "NotFoundError")
        if rank > self.config.max_lora_rank:
            return self._error(
                400,
                f"LoRA rank {rank} is greater than max_lora_rank {self.config.max_lora_rank}.",
                "BadRequestError",
            )
        self.adapters[name] = path
        return web.Response(text=f"Success: LoRA adapter '{name}' added successfully.")

    async def _unload(self, request: web.Request) -> web.Response:
        body = await request.json()
        name = str(body.get("lora_name", ""))
        if name not in self.adapters:
            return self._error(404, f"The lora adapter '{name}' cannot be found.", "NotFoundError")
        del self.adapters[name]
        return web.Response(text=f"Success: LoRA adapter '{name}' removed successfully.")

    def _should_fail(self) -> bool:
        """Deterministic failures: request i fails when floor((i+1)r) > floor(ir)."""
        i, rate = self._request_index, self.config.error_rate
        self._request_index += 1
        return int((i + 1) * rate) > int(i * rate)

    async def _chat(self, request: web.Request) -> web.Response:
        handler = "/v1/chat/completions"
        started = time.monotonic()
        body = await request.json()
        model = str(body.get("model", ""))
        adapter_name = model if model in self.adapters else None
        if (
            model != self.config.base_name
            and model not in self.config.served_model_names
            and adapter_name is None
        ):
            self._count(handler, "POST", 404)
            return self._error(404, f"The model `{model}` does not exist.", "NotFoundError")
        self._running.labels(self.config.base_name).inc()
        try:
            if self.config.added_latency_seconds:
                await asyncio.sleep(self.config.added_latency_seconds)
            if self._should_fail():
                self._count(handler, "POST", 500)
                return self._error(500, "Internal server error (injected).", "InternalServerError")
            req = GenerationRequest(
                model=model,
                adapter_name=adapter_name,
                adapter_path=self.adapters.get(adapter_name) if adapter_name else None,
                messages=list(body.get("messages") or []),
                max_tokens=int(body.get("max_tokens") or 16),
            )
            result = self.generator(req)
            text = await result if inspect.isawaitable(result) else result
        finally:
            self._running.labels(self.config.base_name).dec()
        self._success.labels(self.config.base_name, "stop").inc()
        self._latency.labels(self.config.base_name).observe(time.monotonic() - started)
        self._count(handler, "POST", 200)
        return web.json_response(
            {
                "id": f"chatcmpl-{self._request_index}",
                "object": "chat.completion",
                "created": int(time.time()),
                "model": model,
                "choices": [
                    {
                        "index": 0,
                        "message": {"role": "assistant", "content": text},
                        "finish_reason": "stop",
                    }
                ],
                "usage": {"prompt_tokens": 0, "completion_tokens": len(str(text).split())},
            }
        )

    async def _metrics(self, _: web.Request) -> web.Response:
        return web.Response(body=generate_latest(self.registry), content_type="text/plain")

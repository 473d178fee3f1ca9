"""A small vLLM-compatible OpenAI server, for tests and the embedded demo.

It speaks the parts of vLLM's HTTP API the operator uses, with vLLM's rules, messages and
metric names, as two vLLM generations answer them (``ReferenceConfig.generation``):

- ``"0.11"``: vLLM 0.8.5 to 0.11 (``vllm/entrypoints/openai/serving_models.py``);
- ``"0.34"``: vLLM 0.20 to 0.34 (``vllm/entrypoints/openai/models/serving.py``,
  ``vllm/entrypoints/serve/``).

Each behaviour below names the vLLM file it imitates. Routes:

- ``GET /v1/models``: the base model, then one entry per LoRA adapter (``parent`` set);
- ``POST /v1/load_lora_adapter`` / ``/v1/unload_lora_adapter``, present only with
  runtime LoRA updating on (otherwise the framework's bare 404);
- ``POST /v1/chat/completions`` and ``POST /v1/completions`` with ``model`` = the base
  model or an adapter name; the answer's ``model`` is the adapter that served it;
- ``GET /metrics``: ``vllm:request_success_total``, ``vllm:e2e_request_latency_seconds``
  (vLLM's buckets), ``vllm:num_requests_running``, ``vllm:lora_requests_info``,
  ``vllm:request_generation_tokens``, ``vllm:request_decode_time_seconds`` and
  ``vllm:request_time_per_output_token_seconds`` (one observation per finished request,
  as vllm/v1/metrics/loggers.py records FinishedRequestStats in 0.11 and 0.34),
  ``http_requests_total{handler,method,status}``;
- ``GET /health``.

With an API key (``--api-key`` or ``VLLM_API_KEY``) every ``/v1`` route needs
``Authorization: Bearer <key>``; ``/metrics`` and ``/health`` stay open.

Startup follows vLLM: ``--lora-modules`` adapters are checked when the server starts
(rank above ``--max-lora-rank`` stops it), and so are the process layouts vLLM refuses.
Failures can be injected: a share of requests answered with HTTP 500, added latency, slow
generation (``decode_seconds_per_token``), a crash, loads answered 503
(``unavailable_loads``). Generation is pluggable: by default the answer is a deterministic
echo; pass a ``generator`` (sync or async callable taking a :class:`GenerationRequest`)
to answer with a real model.
"""

from __future__ import annotations

import asyncio
import hashlib
import inspect
import json
import re
import secrets
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Literal

from aiohttp import web
from aiohttp.typedefs import Handler
from finetune_operator.clients.vllm import VLLM_LATENCY_BUCKETS, VLLM_TPOT_BUCKETS
from finetune_operator.serving import vllm_args
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

# build_1_2_5_buckets(max_model_len) in vLLM; the reference model's length is 4096.
GENERATION_TOKEN_BUCKETS = (1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000)

Generation = Literal["0.11", "0.34"]
GENERATIONS: tuple[Generation, ...] = ("0.11", "0.34")

RUNTIME_UPDATING_ENV = "VLLM_ALLOW_RUNTIME_LORA_UPDATING"
API_KEY_ENV = "VLLM_API_KEY"

# vllm/entrypoints/chat_utils.py (0.11) and vllm/renderers/hf.py (0.34).
NO_CHAT_TEMPLATE_MESSAGE = (
    "As of transformers v4.44, default chat template is no longer allowed, so you must "
    "provide a chat template if the tokenizer does not define one."
)


# The body vLLM's ScalingMiddleware sends with its 503 (not an ErrorResponse).
SCALING_MESSAGE = "The model is currently scaling. Please try again later."


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


def runtime_updating_from_env(value: str | None) -> bool:
    """``VLLM_ALLOW_RUNTIME_LORA_UPDATING`` as vLLM reads it (vllm/envs.py, 0.8.5-0.34)."""
    return (value if value is not None else "0").strip().lower() in ("1", "true")


def _flag_values(tokens: Sequence[str], *names: str) -> list[str] | None:
    """Values of the last ``--flag v...`` / ``--flag=v`` (underscores as dashes), or None."""
    wanted = {n.replace("_", "-") for n in names}
    found: list[str] | None = None
    i = 0
    while i < len(tokens):
        token = tokens[i]
        head, eq, inline = token.partition("=")
        flag = "--" + head[2:].replace("_", "-") if head.startswith("--") else head
        if token.startswith("-") and flag in wanted:
            if eq:
                found, i = [inline], i + 1
                continue
            values: list[str] = []
            i += 1
            while i < len(tokens) and not tokens[i].startswith("-"):
                values.append(tokens[i])
                i += 1
            found = values
            continue
        i += 1
    return found


def _int_value(tokens: Sequence[str], *names: str) -> int | None:
    values = _flag_values(tokens, *names)
    return int(values[-1]) if values else None


@dataclass
class ReferenceConfig:
    """A server's configuration: what vLLM's flags and environment say, plus failures."""

    model: str = "tiny-base"
    served_model_names: list[str] = field(default_factory=list)
    enable_lora: bool = True
    max_lora_rank: int = vllm_args.DEFAULT_MAX_LORA_RANK
    max_loras: int = vllm_args.DEFAULT_MAX_LORAS
    lora_modules: dict[str, str] = field(default_factory=dict)
    allow_runtime_lora_updating: bool = True
    error_rate: float = 0.0
    added_latency_seconds: float = 0.0
    # Time each generated token after the first takes (the decode phase): slow generation.
    decode_seconds_per_token: float = 0.0
    generation: Generation = "0.11"
    api_keys: list[str] = field(default_factory=list)
    chat_template: bool = True  # whether the model's tokenizer has one (or --chat-template)
    # False imitates a server that names the adapter in its answers but runs the base model
    # (the engine never schedules the adapter): what the canary's confirmation must catch.
    schedule_adapters: bool = True
    data_parallel_size: int = 1
    api_server_count: int | None = None  # None: vLLM's default for the generation

    @classmethod
    def from_command_line(
        cls, tokens: Sequence[str], env: Mapping[str, str] | None = None, **overrides: Any
    ) -> ReferenceConfig:
        """The configuration a container command line (``vllm serve ...``) and env give."""
        tokens = list(tokens)
        parsed = vllm_args.parse_tokens(tokens)
        if not parsed.is_openai_server:
            raise ServerRefusedToStart("not a vLLM OpenAI server command line")
        config = cls(
            model=parsed.model or "model",
            served_model_names=parsed.served_model_names,
            enable_lora=parsed.enable_lora,
            max_lora_rank=parsed.max_lora_rank,
            max_loras=parsed.max_loras,
            lora_modules={m.name: m.path for m in parsed.lora_modules},
            data_parallel_size=_int_value(tokens, "--data-parallel-size", "-dp") or 1,
            api_server_count=_int_value(tokens, "--api-server-count", "-asc"),
        )
        if _flag_values(tokens, "--chat-template"):
            config.chat_template = True
        if env is not None:
            config.allow_runtime_lora_updating = runtime_updating_from_env(
                env.get(RUNTIME_UPDATING_ENV)
            )
        # vllm/entrypoints/openai/api_server.py (0.11), serve/middleware/register.py (0.34):
        # --api-key takes precedence over VLLM_API_KEY; empty keys are dropped.
        keys = _flag_values(tokens, "--api-key") or [(env or {}).get(API_KEY_ENV, "")]
        config.api_keys = [k for k in keys if k]
        return replace(config, **overrides)

    @property
    def base_name(self) -> str:
        return self.served_model_names[0] if self.served_model_names else self.model

    @property
    def api_servers(self) -> int:
        """API-server processes vLLM starts (vllm/entrypoints/cli/serve.py).

        0.11: ``--api-server-count`` defaults to 1. 0.20+: it defaults to the data
        parallel size (internal load balancing).
        """
        if self.api_server_count is not None:
            return self.api_server_count
        return 1 if self.generation == "0.11" else self.data_parallel_size


def adapter_config(path: str) -> dict[str, Any]:
    """``adapter_config.json`` of an adapter folder, as vLLM's PEFTHelper reads it."""
    config_file = Path(path) / "adapter_config.json"
    try:
        config = json.loads(config_file.read_text(encoding="utf-8"))
    except (FileNotFoundError, NotADirectoryError) as exc:
        raise FileNotFoundError(path) from exc
    except ValueError as exc:
        raise ValueError(f"invalid adapter config: {exc}") from exc
    if not isinstance(config, dict):
        raise ValueError("invalid adapter config: not an object")
    return config


def validate_adapter(config: dict[str, Any], max_lora_rank: int, generation: Generation) -> None:
    """Raise ``ValueError`` where vLLM refuses the adapter (vllm/lora/peft_helper.py).

    ``_validate_features`` then ``validate_legal``; all problems in one message, joined
    by spaces. 0.34 also reads ``rank_pattern`` and refuses any bias outright.
    """
    problems: list[str] = []
    modules_to_save = config.get("modules_to_save") or []
    if generation == "0.11":
        if modules_to_save:
            problems.append("vLLM only supports modules_to_save being None.")
    else:
        unsupported = [m for m in modules_to_save if m not in ("classifier", "score")]
        if unsupported:
            problems.append(
                "vLLM only supports modules_to_save being either None "
                'or ["classifier", "score"] for classification models. '
                f"Unsupported modules_to_save: {unsupported}"
            )
    if config.get("use_dora"):
        problems.append("vLLM does not yet support DoRA.")
    rank = int(config.get("r", 8))
    if generation != "0.11":
        rank = max([rank, *(int(v) for v in (config.get("rank_pattern") or {}).values())])
    if rank > max_lora_rank:
        problems.append(f"LoRA rank {rank} is greater than max_lora_rank {max_lora_rank}.")
    if config.get("bias", "none") != "none":
        problems.append(
            "Adapter bias cannot be used without bias_enabled."
            if generation == "0.11"
            else "Adapter bias is not supported."
        )
    if problems:
        raise ValueError(" ".join(problems))


def sanitize_message(message: str) -> str:
    """vLLM 0.34's error-message scrubbing of file paths and addresses.

    vllm/entrypoints/serve/exception_handling/utils.py (sanitize_message).
    """
    message = re.sub(r" at 0x[0-9a-fA-F]+>", ">", message)
    message = re.sub(r"/(?:home|usr|opt|var|tmp|root|lib|mnt|srv)(?:/[\w.\-]+)+", "<path>", message)
    return message.strip()


class ReferenceServer:
    """One server instance. ``await start()`` binds it; ``await stop()`` or ``crash()`` ends it."""

    def __init__(self, config: ReferenceConfig, generator: Generator | None = None) -> None:
        self.config = config
        self.generator: Generator = generator or echo_generator
        self.adapters: dict[str, str] = {}
        self.adapter_ids: dict[str, int] = {}  # lora_int_id, as vLLM numbers loads
        self.requests_seen: list[str] = []  # "METHOD path" of every request, in order
        # Injected: this many next loads answer 503 and load nothing (a load that gets no
        # final answer), as vLLM's ScalingMiddleware answers every request while an
        # elastic data-parallel server scales (0.11, 0.20 and 0.34 alike).
        self.unavailable_loads = 0
        self.port: int | None = None
        self._runner: web.AppRunner | None = None
        self._request_index = 0
        self._next_lora_id = 0
        self._running_adapters: dict[str, int] = {}
        self._key_hashes = [hashlib.sha256(k.encode()).digest() for k in config.api_keys]
        self.registry = CollectorRegistry()
        labels = ["model_name", "engine"]  # vllm/v1/metrics/loggers.py
        self._success = Counter(
            "vllm:request_success",
            "Count of successfully processed requests.",
            [*labels, "finished_reason"],
            registry=self.registry,
        )
        self._latency = Histogram(
            "vllm:e2e_request_latency_seconds",
            "Histogram of e2e request latency in seconds.",
            labels,
            buckets=VLLM_LATENCY_BUCKETS,
            registry=self.registry,
        )
        # vllm/v1/metrics/loggers.py: per finished request, its generated tokens, its decode
        # time (first to last new token) and that time per token after the first (0 for a
        # one-token answer). Token buckets: build_1_2_5_buckets(max_model_len).
        self._generation_tokens = Histogram(
            "vllm:request_generation_tokens",
            "Number of generation tokens processed.",
            labels,
            buckets=GENERATION_TOKEN_BUCKETS,
            registry=self.registry,
        )
        self._decode_time = Histogram(
            "vllm:request_decode_time_seconds",
            "Histogram of time spent in DECODE phase for request.",
            labels,
            buckets=VLLM_LATENCY_BUCKETS,
            registry=self.registry,
        )
        self._time_per_output_token = Histogram(
            "vllm:request_time_per_output_token_seconds",
            "Histogram of time_per_output_token_seconds per request.",
            labels,
            buckets=VLLM_TPOT_BUCKETS,
            registry=self.registry,
        )
        self._running = Gauge(
            "vllm:num_requests_running",
            "Number of requests in model execution batches.",
            labels,
            registry=self.registry,
        )
        # vllm/v1/metrics/loggers.py: only with LoRA enabled; one sample per
        # (max_lora, waiting, running) combination, set to the current time each step.
        self._lora_info = (
            Gauge(
                "vllm:lora_requests_info",
                "Running stats on lora requests.",
                ["max_lora", "waiting_lora_adapters", "running_lora_adapters"],
                registry=self.registry,
            )
            if config.enable_lora
            else None
        )
        self._http = Counter(
            "http_requests",
            "Total number of requests by method, status and handler.",
            ["handler", "method", "status"],
            registry=self.registry,
        )

    @property
    def generation(self) -> Generation:
        return self.config.generation

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
        if cfg.api_servers > 1 and cfg.allow_runtime_lora_updating:
            # vllm/entrypoints/cli/serve.py (run_multi_api_server), 0.11 and 0.34.
            raise ServerRefusedToStart(
                "VLLM_ALLOW_RUNTIME_LORA_UPDATING cannot be used with api_server_count > 1"
            )
        if cfg.generation == "0.11" and cfg.enable_lora and cfg.data_parallel_size > 1:
            # vllm/v1/metrics/loggers.py (0.11): PrometheusStatLogger refuses LoRA with
            # more than one engine behind the API server.
            raise ServerRefusedToStart("LoRA in DP mode is not supported yet.")
        for name, path in cfg.lora_modules.items():
            # vllm/entrypoints/openai/serving_models.py (init_static_loras): a failed
            # static load raises with the load error's message.
            error = self._add_lora(name, path)
            if error is not None:
                raise ServerRefusedToStart(error[1])

    async def start(self, host: str = "127.0.0.1", port: int = 0) -> int:
        self.check_startup()
        self.adapters = {}
        self.adapter_ids = {}
        for name, path in self.config.lora_modules.items():
            self._register(name, path)
        app = web.Application(middlewares=[self._record, self._authenticate])
        app.router.add_get("/health", self._health)
        app.router.add_get("/v1/models", self._models)
        if self.config.allow_runtime_lora_updating:
            # vllm/entrypoints/openai/api_server.py (0.11), serve/lora/api_router.py
            # (0.34): the routes are registered only with runtime updating on.
            app.router.add_post("/v1/load_lora_adapter", self._load)
            app.router.add_post("/v1/unload_lora_adapter", self._unload)
        app.router.add_post("/v1/chat/completions", self._chat)
        app.router.add_post("/v1/completions", self._completions)
        app.router.add_get("/metrics", self._metrics)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, host, port)
        await site.start()
        server = site._server
        assert server is not None
        # Typed as asyncio.AbstractServer, which has no `sockets`; the running server has them.
        self.port = int(server.sockets[0].getsockname()[1])  # type: ignore[attr-defined]
        return self.port

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    async def crash(self) -> None:
        """Stop answering at once, losing every runtime-loaded adapter (like a dead process)."""
        self.adapters, self.adapter_ids = {}, {}
        await self.stop()

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    # ------------------------------------------------------------ middleware

    @web.middleware
    async def _record(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        self.requests_seen.append(f"{request.method} {request.path}")
        try:
            return await handler(request)
        except web.HTTPNotFound:
            # FastAPI's answer for a route that does not exist.
            return web.json_response({"detail": "Not Found"}, status=404)

    @web.middleware
    async def _authenticate(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        """vLLM's AuthenticationMiddleware.

        0.11: vllm/entrypoints/openai/api_server.py guards paths starting with ``/v1``;
        0.34: vllm/entrypoints/serve/middleware/authenticate.py guards ``/v1``, ``/v2``,
        ``/inference`` and ``/cohere``. OPTIONS passes; the scheme is case-insensitive;
        the answer is 401 ``{"error": "Unauthorized"}``.
        """
        guarded = ("/v1",) if self.generation == "0.11" else ("/v1", "/v2", "/inference", "/cohere")
        if (
            self._key_hashes
            and request.method != "OPTIONS"
            and request.path.startswith(guarded)
            and not self._token_ok(request.headers.get("Authorization"))
        ):
            return web.json_response({"error": "Unauthorized"}, status=401)
        return await handler(request)

    def _token_ok(self, header: str | None) -> bool:
        if not header:
            return False
        scheme, _, param = header.partition(" ")
        if scheme.lower() != "bearer":
            return False
        digest = hashlib.sha256(param.encode()).digest()
        match = False
        for key_hash in self._key_hashes:
            match |= secrets.compare_digest(digest, key_hash)
        return match

    # ------------------------------------------------------------ helpers

    def _count(self, handler: str, method: str, status: int) -> None:
        self._http.labels(handler, method, f"{status // 100}xx").inc()

    def _error(self, status: int, message: str, kind: str) -> web.Response:
        """vLLM's ErrorResponse; 0.34 scrubs paths from every message first."""
        if self.generation != "0.11":
            message = sanitize_message(message)
        body = {"error": {"message": message, "type": kind, "param": None, "code": status}}
        return web.json_response(body, status=status)

    def _register(self, name: str, path: str) -> None:
        """Record a loaded adapter; a name still loaded (in-place load) keeps its id."""
        if name not in self.adapters:
            self._next_lora_id += 1
            self.adapter_ids[name] = self._next_lora_id
        self.adapters[name] = path

    def _add_lora(self, name: str, path: str) -> tuple[int, str, str] | None:
        """The engine's ``add_lora``: None when it loads, else (status, message, type).

        The engine runs in its own process; a failure comes back as
        ``Call to add_lora method failed: <error>`` (vllm/v1/engine/core.py).
        0.11 answers every failure 400 BadRequestError, 404 NotFoundError when it says
        "No adapter found" (vllm/entrypoints/openai/serving_models.py). 0.34 answers 404
        with LoRAAdapterNotFoundError's own message and any other failure 500
        InternalServerError (vllm/entrypoints/openai/models/serving.py).
        """
        try:
            if not self.config.enable_lora:
                # vllm/v1/worker/lora_model_runner_mixin.py (_ensure_lora_enabled).
                raise RuntimeError("LoRA is not enabled. Use --enable-lora to enable LoRA.")
            try:
                config = adapter_config(path)
            except FileNotFoundError as exc:
                # vllm/lora/worker_manager.py (_load_adapter)
                raise ValueError(
                    f"Loading lora {name} failed: No adapter found for {path}"
                ) from exc
            validate_adapter(config, self.config.max_lora_rank, self.generation)
        except (ValueError, RuntimeError) as exc:
            engine_message = f"Call to add_lora method failed: {exc}"
            not_found = "No adapter found" in str(exc)
            if self.generation == "0.11":
                if not_found:
                    return 404, engine_message, "NotFoundError"
                return 400, engine_message, "BadRequestError"
            if not_found:
                return 404, str(exc), "NotFoundError"
            return 500, engine_message, "InternalServerError"
        return None

    # ------------------------------------------------------------ handlers

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
        body = await request.json()
        if self.unavailable_loads > 0:
            self.unavailable_loads -= 1
            return web.json_response({"error": SCALING_MESSAGE}, status=503)
        name, path = str(body.get("lora_name", "")), str(body.get("lora_path", ""))
        # 0.11's LoadLoRAAdapterRequest has no load_inplace (pydantic drops the field);
        # 0.20+ (serve/lora/protocol.py) has it.
        in_place = self.generation != "0.11" and bool(body.get("load_inplace"))
        if not name or not path:
            return self._error(
                400, "Both 'lora_name' and 'lora_path' must be provided.", "InvalidUserInput"
            )
        if self.generation != "0.11" and (
            name == self.config.base_name or name in self.config.served_model_names
        ):
            return self._error(
                400,
                f"The lora adapter '{name}' conflicts with a served base model.",
                "InvalidUserInput",
            )
        if name in self.adapters and not in_place:
            message = f"The lora adapter '{name}' has already been loaded."
            if self.generation != "0.11":
                message += " If you want to load the adapter in place, set 'load_inplace' to True."
            return self._error(400, message, "InvalidUserInput")
        error = self._add_lora(name, path)
        if error is not None:
            return self._error(*error)
        self._register(name, path)  # an in-place load keeps the adapter's lora_int_id
        return web.Response(text=f"Success: LoRA adapter '{name}' added successfully.")

    async def _unload(self, request: web.Request) -> web.Response:
        body = await request.json()
        name = str(body.get("lora_name", ""))
        if not name:
            return self._error(
                400,
                "'lora_name' needs to be provided to unload a LoRA adapter.",
                "InvalidUserInput",
            )
        if name not in self.adapters:
            return self._error(404, f"The lora adapter '{name}' cannot be found.", "NotFoundError")
        del self.adapters[name]
        del self.adapter_ids[name]
        return web.Response(text=f"Success: LoRA adapter '{name}' removed successfully.")

    def _should_fail(self) -> bool:
        """Deterministic failures: request i fails when floor((i+1)r) > floor(ir)."""
        i, rate = self._request_index, self.config.error_rate
        self._request_index += 1
        return int((i + 1) * rate) > int(i * rate)

    def _lora_step(self) -> None:
        """One engine step's ``vllm:lora_requests_info`` sample."""
        if self._lora_info is None:
            return
        running = ",".join(n for n, c in self._running_adapters.items() if c > 0)
        self._lora_info.labels(str(self.config.max_loras), "", running).set_to_current_time()

    async def _decode(self, tokens: int) -> float:
        """The decode phase: the first token came with prefill, each later one takes
        ``decode_seconds_per_token``. Returns the time from first to last token."""
        first_token = time.monotonic()
        if tokens > 1 and self.config.decode_seconds_per_token > 0:
            await asyncio.sleep((tokens - 1) * self.config.decode_seconds_per_token)
        return time.monotonic() - first_token

    def _observe_generation(self, tokens: int, decode_seconds: float) -> None:
        """vllm/v1/metrics/stats.py update_from_finished_request: time per output token is
        decode time over tokens after the first, 0 for a one-token answer."""
        base = self.config.base_name
        self._generation_tokens.labels(base, "0").observe(tokens)
        self._decode_time.labels(base, "0").observe(decode_seconds)
        per_token = decode_seconds / (tokens - 1) if tokens > 1 else 0.0
        self._time_per_output_token.labels(base, "0").observe(per_token)

    async def _chat(self, request: web.Request) -> web.Response:
        body = await request.json()
        return await self._generate(
            "/v1/chat/completions", body, list(body.get("messages") or []), chat=True
        )

    async def _completions(self, request: web.Request) -> web.Response:
        body = await request.json()
        prompt = body.get("prompt")
        text = prompt if isinstance(prompt, str) else json.dumps(prompt)
        return await self._generate(
            "/v1/completions", body, [{"role": "user", "content": text}], chat=False
        )

    async def _generate(
        self, handler: str, body: dict[str, Any], messages: list[dict[str, Any]], chat: bool
    ) -> web.Response:
        started = time.monotonic()
        model = str(body.get("model", ""))
        adapter_name = model if model in self.adapters else None
        if (
            model != self.config.base_name
            and model not in self.config.served_model_names
            and adapter_name is None
        ):
            # vllm/entrypoints/openai/serving_engine.py (_check_model), 0.11 and 0.34.
            self._count(handler, "POST", 404)
            return self._error(404, f"The model `{model}` does not exist.", "NotFoundError")
        if chat and not self.config.chat_template:
            # 0.11: serving_chat.py answers f"{e} {e.__cause__}" as 400 BadRequestError;
            # 0.34: ChatTemplateResolutionError is a client error, 400 with its message.
            message = NO_CHAT_TEMPLATE_MESSAGE
            if self.generation == "0.11":
                message += " None"
            self._count(handler, "POST", 400)
            return self._error(400, message, "BadRequestError")
        base = self.config.base_name
        self._running.labels(base, "0").inc()
        scheduled = adapter_name if self.config.schedule_adapters else None
        if scheduled:
            self._running_adapters[scheduled] = self._running_adapters.get(scheduled, 0) + 1
        self._lora_step()
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
                messages=messages,
                max_tokens=int(body.get("max_tokens") or 16),
            )
            result = self.generator(req)
            text = await result if inspect.isawaitable(result) else result
            tokens = len(str(text).split())
            decode_seconds = await self._decode(tokens)
        finally:
            self._running.labels(base, "0").dec()
            if scheduled:
                self._running_adapters[scheduled] -= 1
            self._lora_step()
        self._success.labels(base, "0", "stop").inc()
        self._latency.labels(base, "0").observe(time.monotonic() - started)
        self._observe_generation(tokens, decode_seconds)
        self._count(handler, "POST", 200)
        # The answer's model is the adapter that served it (OpenAIServingModels.model_name).
        usage = {"prompt_tokens": 0, "completion_tokens": tokens}
        if chat:
            choice: dict[str, Any] = {
                "index": 0,
                "message": {"role": "assistant", "content": text},
                "finish_reason": "stop",
            }
            kind, prefix = "chat.completion", "chatcmpl"
        else:
            choice = {"index": 0, "text": text, "finish_reason": "stop"}
            kind, prefix = "text_completion", "cmpl"
        return web.json_response(
            {
                "id": f"{prefix}-{self._request_index}",
                "object": kind,
                "created": int(time.time()),
                "model": model,
                "choices": [choice],
                "usage": usage,
            }
        )

    async def _metrics(self, _: web.Request) -> web.Response:
        return web.Response(body=generate_latest(self.registry), content_type="text/plain")

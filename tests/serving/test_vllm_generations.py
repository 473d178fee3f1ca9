"""The vLLM client against the reference server imitating both vLLM generations.

Each test runs once per generation ("0.11": vLLM 0.8.5-0.11, "0.34": vLLM 0.20-0.34); where
the generations answer differently the test says what each one answers (taken from vLLM's
source, cited in finetune_local/vllm_reference.py).
"""

from __future__ import annotations

import json
import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from finetune_local.vllm_reference import (
    GENERATIONS,
    ReferenceConfig,
    ReferenceServer,
    ServerRefusedToStart,
    runtime_updating_from_env,
)
from finetune_operator.clients.vllm import (
    VllmClient,
    VllmError,
    VllmErrorKind,
)

API_KEY = "sk-test-3f9a1c77d2e04b5e"


@pytest.fixture(params=GENERATIONS)
def generation(request: pytest.FixtureRequest) -> str:
    return str(request.param)


def adapter(root: Path, name: str, rank: int = 8, **config: Any) -> str:
    path = root / name
    path.mkdir(parents=True)
    (path / "adapter_config.json").write_text(
        json.dumps({"r": rank, "peft_type": "LORA", **config})
    )
    return str(path)


@asynccontextmanager
async def serving(
    generation: str, api_key: str | None = None, **config: Any
) -> AsyncIterator[tuple[ReferenceServer, VllmClient]]:
    server = ReferenceServer(ReferenceConfig(model="base", generation=generation, **config))  # type: ignore[arg-type]
    await server.start()
    try:
        async with aiohttp.ClientSession() as session:
            yield server, VllmClient(session, timeout=5, api_key=api_key)
    finally:
        await server.stop()


async def load_error(client: VllmClient, server: ReferenceServer, path: str) -> VllmError:
    with pytest.raises(VllmError) as err:
        await client.load_adapter(server.endpoint, "a", path)
    return err.value


# ------------------------------------------------------------------ load errors


async def test_rank_above_max_is_a_permanent_adapter_fault(tmp_path: Path, generation: str) -> None:
    async with serving(generation) as (server, client):
        err = await load_error(client, server, adapter(tmp_path, "big", rank=64))
    # vLLM 0.11 answers 400, vLLM 0.20+ 500 for the same refusal; both are permanent.
    assert err.status == (400 if generation == "0.11" else 500)
    assert err.kind is VllmErrorKind.RANK_TOO_HIGH
    assert err.kind.adapter_fault and err.permanent
    assert err.message == "LoRA rank 64 is greater than max_lora_rank 16."


@pytest.mark.parametrize(
    "config",
    [{"use_dora": True}, {"modules_to_save": ["lm_head"]}, {"bias": "all"}],
    ids=["dora", "modules_to_save", "bias"],
)
async def test_unsupported_adapter_is_a_permanent_adapter_fault(
    tmp_path: Path, generation: str, config: dict[str, Any]
) -> None:
    async with serving(generation) as (server, client):
        err = await load_error(client, server, adapter(tmp_path, "odd", **config))
    assert err.status == (400 if generation == "0.11" else 500)
    assert err.kind is VllmErrorKind.ADAPTER_UNSUPPORTED and err.permanent
    assert "Call to add_lora" not in err.message  # vLLM's engine wrapper is dropped


async def test_lora_not_enabled_is_permanent(tmp_path: Path, generation: str) -> None:
    async with serving(generation, enable_lora=False) as (server, client):
        err = await load_error(client, server, adapter(tmp_path, "a"))
    assert err.status == (400 if generation == "0.11" else 500)
    assert err.kind is VllmErrorKind.LORA_NOT_ENABLED and err.permanent
    assert "--enable-lora" in err.message


async def test_missing_adapter_folder(tmp_path: Path, generation: str) -> None:
    async with serving(generation) as (server, client):
        err = await load_error(client, server, str(tmp_path / "nowhere"))
    assert err.status == 404
    assert err.kind is VllmErrorKind.ADAPTER_NOT_FOUND and err.permanent
    assert "No adapter found" in err.message


async def test_runtime_updating_off(tmp_path: Path, generation: str) -> None:
    async with serving(generation, allow_runtime_lora_updating=False) as (server, client):
        err = await load_error(client, server, adapter(tmp_path, "a"))
        with pytest.raises(VllmError) as unload:
            await client.unload_adapter(server.endpoint, "a")
    assert err.status == 404 and err.kind is VllmErrorKind.RUNTIME_UPDATING_DISABLED
    assert "VLLM_ALLOW_RUNTIME_LORA_UPDATING" in err.message
    assert unload.value.kind is VllmErrorKind.RUNTIME_UPDATING_DISABLED


async def test_unknown_server_error_is_transient(generation: str) -> None:
    async with serving(generation, error_rate=1.0) as (server, client):
        outcome = await client.smoke(server.endpoint, "base", "hi")
    assert not outcome.ok and outcome.status == 500
    assert outcome.kind is VllmErrorKind.SERVER_ERROR and outcome.kind.transient


async def test_unreachable_is_transient(generation: str) -> None:
    async with serving(generation) as (server, client):
        await server.crash()
        with pytest.raises(VllmError) as err:
            await client.loaded_adapters(server.endpoint)
    assert err.value.status is None and err.value.kind is VllmErrorKind.UNREACHABLE
    assert not err.value.permanent


# ------------------------------------------------------------------ load, reload, unload


async def test_already_loaded(tmp_path: Path, generation: str) -> None:
    path = adapter(tmp_path, "a")
    async with serving(generation) as (server, client):
        await client.load_adapter(server.endpoint, "a", path)
        err = await load_error(client, server, path)
    assert err.status == 400 and err.kind is VllmErrorKind.ALREADY_LOADED


async def test_reload_in_place_where_supported(tmp_path: Path, generation: str) -> None:
    v1, v2 = adapter(tmp_path, "v1"), adapter(tmp_path, "v2")
    async with serving(generation) as (server, client):
        await client.load_adapter(server.endpoint, "a", v1)
        lora_id = server.adapter_ids["a"]
        await client.load_adapter(server.endpoint, "a", v2, replace=True)
        assert await client.loaded_adapters(server.endpoint) == {"a": v2}
        # Loading a name that is not loaded yet works the same with replace.
        await client.load_adapter(server.endpoint, "b", v1, replace=True)
        assert set(await client.loaded_adapters(server.endpoint)) == {"a", "b"}
    unloads = [r for r in server.requests_seen if r.endswith("/v1/unload_lora_adapter")]
    if generation == "0.11":
        # No load_inplace before vLLM 0.20: the client unloads and loads again.
        assert unloads == ["POST /v1/unload_lora_adapter"]
    else:
        # vLLM 0.20+ swaps the weights in place: the adapter never stops being served.
        assert unloads == [] and server.adapter_ids["a"] == lora_id


async def test_unload_of_an_absent_adapter_is_fine(generation: str) -> None:
    async with serving(generation) as (server, client):
        await client.unload_adapter(server.endpoint, "never-loaded")


async def test_adapter_named_like_the_base_model(tmp_path: Path, generation: str) -> None:
    async with serving(generation) as (server, client):
        if generation == "0.11":
            # vLLM 0.11 does not check; the name then shadows nothing useful but loads.
            await client.load_adapter(server.endpoint, "base", adapter(tmp_path, "a"))
            return
        with pytest.raises(VllmError) as err:
            await client.load_adapter(server.endpoint, "base", adapter(tmp_path, "a"))
    assert err.value.status == 400 and err.value.kind is VllmErrorKind.REJECTED


# ------------------------------------------------------------------ smoke requests


async def test_smoke_falls_back_to_completions_without_chat_template(
    tmp_path: Path, generation: str
) -> None:
    async with serving(generation, chat_template=False) as (server, client):
        await client.load_adapter(server.endpoint, "a", adapter(tmp_path, "a"))
        first = await client.smoke(server.endpoint, "a", "hello")
        second = await client.smoke(server.endpoint, "a", "hello")
    assert first.ok and second.ok, (first, second)
    assert first.handler == second.handler == "/v1/completions"
    assert first.model == "a"
    # The endpoint is remembered: only the first smoke request tried chat.
    chats = [r for r in server.requests_seen if r == "POST /v1/chat/completions"]
    assert len(chats) == 1


async def test_smoke_uses_chat_where_the_model_has_a_template(
    tmp_path: Path, generation: str
) -> None:
    async with serving(generation) as (server, client):
        await client.load_adapter(server.endpoint, "a", adapter(tmp_path, "a"))
        outcome = await client.smoke(server.endpoint, "a", "hello")
    assert outcome.ok and outcome.handler == "/v1/chat/completions" and outcome.model == "a"
    assert "POST /v1/completions" not in server.requests_seen


async def test_smoke_for_a_model_the_server_lacks(generation: str) -> None:
    async with serving(generation) as (server, client):
        outcome = await client.smoke(server.endpoint, "nope", "hi")
    assert not outcome.ok and outcome.status == 404
    assert outcome.kind is VllmErrorKind.MODEL_NOT_FOUND
    assert "does not exist" in (outcome.error or "")


async def test_adapter_confirmed_in_lora_requests_info(tmp_path: Path, generation: str) -> None:
    async with serving(generation, max_loras=4) as (server, client):
        await client.load_adapter(server.endpoint, "a", adapter(tmp_path, "a"))
        before = await client.lora_requests_info(server.endpoint)
        assert (await client.smoke(server.endpoint, "a", "hello")).ok
        after = await client.lora_requests_info(server.endpoint)
    assert "a" not in before.seen
    assert "a" in after.seen and after.max_lora == 4
    assert after.running == frozenset()  # the newest engine step has nothing running


# ------------------------------------------------------------------ API keys


async def test_api_key_guards_v1_but_not_metrics(generation: str, caplog: Any) -> None:
    caplog.set_level(logging.DEBUG)
    async with serving(generation, api_keys=[API_KEY]) as (server, client):
        with pytest.raises(VllmError) as err:
            await client.loaded_adapters(server.endpoint)
        assert err.value.status == 401 and err.value.kind is VllmErrorKind.UNAUTHORIZED
        assert not err.value.kind.adapter_fault
        assert "requires an API key" in err.value.message
        await client.metrics(server.endpoint)  # /metrics is not guarded
        keyed = client.with_api_key(API_KEY)
        assert await keyed.loaded_adapters(server.endpoint) == {}
        assert (await keyed.smoke(server.endpoint, "base", "hi")).ok
        wrong = client.with_api_key("sk-wrong-" + API_KEY[::-1])
        with pytest.raises(VllmError) as refused:
            await wrong.loaded_adapters(server.endpoint)
        smoke = await wrong.smoke(server.endpoint, "base", "hi")
    assert refused.value.kind is VllmErrorKind.UNAUTHORIZED
    assert "refused the API key" in refused.value.message
    assert not smoke.ok and smoke.kind is VllmErrorKind.UNAUTHORIZED
    for text in (str(err.value), str(refused.value), smoke.error or "", repr(keyed), caplog.text):
        assert API_KEY not in text and API_KEY[::-1] not in text


async def test_api_key_sent_on_every_v1_call(tmp_path: Path, generation: str) -> None:
    path = adapter(tmp_path, "a")
    async with serving(generation, api_key=API_KEY, api_keys=[API_KEY]) as (server, client):
        await client.load_adapter(server.endpoint, "a", path)
        await client.load_adapter(server.endpoint, "a", path, replace=True)
        assert (await client.smoke(server.endpoint, "a", "hi")).ok
        await client.unload_adapter(server.endpoint, "a")
        assert await client.loaded_adapters(server.endpoint) == {}


def test_api_key_from_flag_or_environment() -> None:
    tokens = ["vllm", "serve", "m", "--enable-lora"]
    env = {"VLLM_API_KEY": "from-env"}
    assert ReferenceConfig.from_command_line(tokens, env).api_keys == ["from-env"]
    # --api-key wins over VLLM_API_KEY; an empty variable means no key.
    flagged = ReferenceConfig.from_command_line([*tokens, "--api-key=from-flag"], env)
    assert flagged.api_keys == ["from-flag"]
    assert ReferenceConfig.from_command_line(tokens, {"VLLM_API_KEY": ""}).api_keys == []


# ------------------------------------------------------------------ startup and environment


@pytest.mark.parametrize(
    ("value", "on"),
    [("1", True), ("true", True), (" TRUE ", True), ("True", True),
     ("yes", False), ("on", False), ("0", False), ("", False), (None, False)],
)  # fmt: skip
def test_runtime_updating_env_as_vllm_reads_it(value: str | None, on: bool) -> None:
    assert runtime_updating_from_env(value) is on


def test_data_parallel_api_servers_refuse_runtime_updating(generation: str) -> None:
    tokens = ["vllm", "serve", "m", "--enable-lora", "--data-parallel-size", "2"]
    runtime_on = {"VLLM_ALLOW_RUNTIME_LORA_UPDATING": "1"}
    config = ReferenceConfig.from_command_line(tokens, runtime_on, generation=generation)
    server = ReferenceServer(config)
    if generation == "0.11":
        # 0.11 runs one API server by default; its stat logger refuses LoRA with DP.
        with pytest.raises(ServerRefusedToStart, match="LoRA in DP mode is not supported"):
            server.check_startup()
    else:
        # 0.20+ start one API server per data-parallel rank by default.
        with pytest.raises(ServerRefusedToStart, match="api_server_count > 1"):
            server.check_startup()
    two_servers = ReferenceConfig.from_command_line(
        ["vllm", "serve", "m", "--api-server-count", "2"], runtime_on, generation=generation
    )
    with pytest.raises(ServerRefusedToStart, match="api_server_count > 1"):
        ReferenceServer(two_servers).check_startup()
    if generation != "0.11":
        # Without runtime updating several API servers are fine.
        ReferenceServer(
            ReferenceConfig.from_command_line(tokens, {}, generation=generation)
        ).check_startup()

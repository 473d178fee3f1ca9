"""The vLLM client against the reference server (real HTTP on 127.0.0.1)."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import aiohttp
import pytest
from finetune_local.vllm_reference import (
    GENERATIONS,
    ReferenceConfig,
    ReferenceServer,
    ServerRefusedToStart,
)
from finetune_operator.clients.vllm import VllmClient, VllmError, parse_metrics
from finetune_operator.planners.adapterdeployment import histogram_quantile
from prometheus_client.parser import text_string_to_metric_families


def make_adapter(root: Path, name: str, rank: int) -> str:
    path = root / name
    path.mkdir(parents=True)
    (path / "adapter_config.json").write_text(json.dumps({"r": rank, "peft_type": "LORA"}))
    return str(path)


METRICS_TEXT = """\
# HELP vllm:request_success_total Count of successfully processed requests.
# TYPE vllm:request_success_total counter
vllm:request_success_total{finished_reason="stop",model_name="m"} 90.0
vllm:request_success_total{finished_reason="length",model_name="m"} 5.0
# TYPE vllm:e2e_request_latency_seconds histogram
vllm:e2e_request_latency_seconds_bucket{le="0.3",model_name="m"} 50.0
vllm:e2e_request_latency_seconds_bucket{le="0.5",model_name="m"} 90.0
vllm:e2e_request_latency_seconds_bucket{le="1.0",model_name="m"} 95.0
vllm:e2e_request_latency_seconds_bucket{le="+Inf",model_name="m"} 95.0
vllm:e2e_request_latency_seconds_count{model_name="m"} 95.0
vllm:e2e_request_latency_seconds_sum{model_name="m"} 30.0
# TYPE http_requests_total counter
http_requests_total{handler="/v1/chat/completions",method="POST",status="2xx"} 95.0
http_requests_total{handler="/v1/chat/completions",method="POST",status="5xx"} 5.0
http_requests_total{handler="/metrics",method="GET",status="2xx"} 400.0
"""


def test_parse_metrics() -> None:
    s = parse_metrics(METRICS_TEXT)
    assert (s.requests, s.errors, s.successes, s.latency_count) == (100, 5, 95, 95)
    # p95 rank 90.25 falls in (0.5, 1.0]: 0.5 + 0.5 * 0.25 / 5
    assert histogram_quantile(0.95, s.latency_buckets) == pytest.approx(0.525)


def test_parse_metrics_without_http_instrumentation() -> None:
    text = 'vllm:request_success_total{finished_reason="stop"} 7\n'
    assert parse_metrics(text).requests == 7


def generation_histograms(labels: str) -> str:
    """Two finished requests (8 and 1 generated tokens, 0.35 s of decoding in all) as the
    three exports of vLLM's per-request histograms write them with ``labels``."""
    return f"""\
# TYPE vllm:request_generation_tokens histogram
vllm:request_generation_tokens_bucket{{{labels},le="1.0"}} 1.0
vllm:request_generation_tokens_bucket{{{labels},le="10.0"}} 2.0
vllm:request_generation_tokens_bucket{{{labels},le="+Inf"}} 2.0
vllm:request_generation_tokens_count{{{labels}}} 2.0
vllm:request_generation_tokens_sum{{{labels}}} 9.0
# TYPE vllm:request_decode_time_seconds histogram
vllm:request_decode_time_seconds_bucket{{{labels},le="0.3"}} 1.0
vllm:request_decode_time_seconds_bucket{{{labels},le="0.5"}} 2.0
vllm:request_decode_time_seconds_bucket{{{labels},le="+Inf"}} 2.0
vllm:request_decode_time_seconds_count{{{labels}}} 2.0
vllm:request_decode_time_seconds_sum{{{labels}}} 0.35
"""


# vllm/engine/metrics.py (0.8.5, engine V0): labels model_name only, and the per-iteration
# vllm:time_per_output_token_seconds, which is not per request and must not be read.
GENERATION_0_8_5 = (
    generation_histograms('model_name="m"')
    + """\
# TYPE vllm:time_per_output_token_seconds histogram
vllm:time_per_output_token_seconds_bucket{model_name="m",le="0.01"} 0.0
vllm:time_per_output_token_seconds_bucket{model_name="m",le="+Inf"} 7.0
vllm:time_per_output_token_seconds_count{model_name="m"} 7.0
vllm:time_per_output_token_seconds_sum{model_name="m"} 70.0
"""
)
# vllm/v1/metrics/loggers.py (0.11 to 0.34): per engine, plus the per-request time per
# output token (0 for the one-token request); two engines of one server add up.
GENERATION_V1 = (
    generation_histograms('engine="0",model_name="m"')
    + generation_histograms('engine="1",model_name="m"')
    + """\
# TYPE vllm:request_time_per_output_token_seconds histogram
vllm:request_time_per_output_token_seconds_bucket{engine="0",model_name="m",le="0.01"} 1.0
vllm:request_time_per_output_token_seconds_bucket{engine="0",model_name="m",le="+Inf"} 2.0
vllm:request_time_per_output_token_seconds_count{engine="0",model_name="m"} 2.0
vllm:request_time_per_output_token_seconds_sum{engine="0",model_name="m"} 0.05
"""
)


@pytest.mark.parametrize(
    ("text", "servers"), [(GENERATION_0_8_5, 1), (GENERATION_V1, 2)], ids=["0.8.5", "0.11-0.34"]
)
def test_parse_generation_speed_per_vllm_generation(text: str, servers: int) -> None:
    s = parse_metrics(text)
    assert (s.generation_tokens, s.generation_requests) == (9 * servers, 2 * servers)
    assert s.decode_seconds == pytest.approx(0.35 * servers)
    # 7 tokens after the first token of each request, in 0.35 s: 20 tokens/s.
    assert s.decode_tokens == 7 * servers
    assert s.tokens_per_second_per_request == pytest.approx(20.0)


def test_parse_generation_speed_without_the_metrics() -> None:
    s = parse_metrics(METRICS_TEXT)
    assert s.decode_tokens == 0 and s.tokens_per_second_per_request is None


def test_parse_metrics_ignores_negative_values() -> None:
    text = GENERATION_0_8_5.replace('_sum{model_name="m"} 0.35', '_sum{model_name="m"} -1')
    assert parse_metrics(text).decode_seconds == 0.0


@pytest.fixture(params=GENERATIONS)
def generation(request: pytest.FixtureRequest) -> str:
    return str(request.param)


async def test_load_smoke_unload_and_metrics(tmp_path: Path, generation: str) -> None:
    a = make_adapter(tmp_path, "a", 8)
    server = ReferenceServer(
        ReferenceConfig(model="base", lora_modules={"static": a}, generation=generation)  # type: ignore[arg-type]
    )
    await server.start()
    try:
        async with aiohttp.ClientSession() as session:
            client = VllmClient(session, timeout=5)
            ep = server.endpoint
            assert await client.loaded_adapters(ep) == {"static": a}
            await client.load_adapter(ep, "support", a)
            with pytest.raises(VllmError, match="already been loaded"):
                await client.load_adapter(ep, "support", a)
            assert set(await client.loaded_adapters(ep)) == {"static", "support"}
            ok = await client.smoke(ep, "support", "hello there")
            assert ok.ok and ok.latency_ms > 0
            missing = await client.smoke(ep, "nope", "hi")
            assert not missing.ok and "does not exist" in (missing.error or "")
            await client.unload_adapter(ep, "support")
            await client.unload_adapter(ep, "support")  # already gone: fine
            assert set(await client.loaded_adapters(ep)) == {"static"}
            m = await client.metrics(ep)
            assert (m.requests, m.errors, m.successes) == (2, 0, 1)
            assert sum(1 for v in m.latency_buckets.values() if v == 1) >= 1
    finally:
        await server.stop()


async def test_rank_limits(tmp_path: Path, generation: str) -> None:
    big = make_adapter(tmp_path, "big", 64)
    config = ReferenceConfig(generation=generation)  # type: ignore[arg-type]
    with pytest.raises(ServerRefusedToStart, match="greater than max_lora_rank 16"):
        ReferenceServer(replace(config, lora_modules={"big": big})).check_startup()
    server = ReferenceServer(config)
    await server.start()
    try:
        async with aiohttp.ClientSession() as session:
            with pytest.raises(VllmError, match="greater than max_lora_rank") as err:
                await VllmClient(session).load_adapter(server.endpoint, "big", big)
            # vLLM 0.11 refuses with 400, vLLM 0.20+ with 500.
            assert err.value.status == (400 if generation == "0.11" else 500)
            with pytest.raises(VllmError, match="No adapter found"):
                await VllmClient(session).load_adapter(server.endpoint, "x", str(tmp_path / "none"))
    finally:
        await server.stop()


async def test_injected_errors_latency_and_crash(tmp_path: Path, generation: str) -> None:
    server = ReferenceServer(
        ReferenceConfig(
            model="m",
            error_rate=0.5,
            added_latency_seconds=0.31,
            generation=generation,  # type: ignore[arg-type]
        )
    )
    await server.start()
    ep = server.endpoint
    async with aiohttp.ClientSession() as session:
        client = VllmClient(session, timeout=5)
        results = [await client.smoke(ep, "m", "x") for _ in range(4)]
        assert [r.ok for r in results].count(False) == 2
        m = await client.metrics(ep)
        assert (m.requests, m.errors) == (4, 2)
        # Two successes, both slower than the 0.3 s bucket.
        assert m.latency_buckets[0.3] == 0 and m.latency_buckets[0.5] == 2
        await server.crash()
        with pytest.raises(VllmError, match="unreachable"):
            await client.loaded_adapters(ep)
        down = await client.smoke(ep, "m", "x")
        assert not down.ok


def test_config_from_command_line() -> None:
    cfg = ReferenceConfig.from_command_line(
        ["vllm", "serve", "org/base", "--enable-lora", "--max-lora-rank", "32",
         "--lora-modules", "a=/x", "--served-model-name", "base"],
        error_rate=0.1,
    )  # fmt: skip
    assert (cfg.base_name, cfg.max_lora_rank, cfg.lora_modules, cfg.error_rate) == (
        "base",
        32,
        {"a": "/x"},
        0.1,
    )


async def test_pluggable_generator() -> None:
    async def gen(req):
        return f"{req.adapter_name}:{len(req.messages)}"

    server = ReferenceServer(ReferenceConfig(model="m"), generator=gen)
    await server.start()
    try:
        async with (
            aiohttp.ClientSession() as session,
            session.post(
                server.endpoint + "/v1/chat/completions",
                json={"model": "m", "messages": [{"role": "user", "content": "q"}]},
            ) as r,
        ):
            answer = await r.json()
        assert answer["choices"][0]["message"]["content"] == "None:1"
    finally:
        await server.stop()


async def test_slow_generation_is_exported_as_vllm_does(generation: str) -> None:
    server = ReferenceServer(
        ReferenceConfig(model="m", decode_seconds_per_token=0.02, generation=generation)  # type: ignore[arg-type]
    )
    await server.start()
    try:
        async with aiohttp.ClientSession() as session:
            client = VllmClient(session, timeout=5)
            assert (await client.smoke(server.endpoint, "m", "one two three")).ok  # 4 tokens
            assert (await client.smoke(server.endpoint, "m", "x", max_tokens=1)).ok  # 1 token
            text = await client.metrics_text(server.endpoint)
    finally:
        await server.stop()
    m = parse_metrics(text)
    assert (m.generation_tokens, m.generation_requests, m.decode_tokens) == (5, 2, 3)
    # Three decode steps of at least 0.02 s each: at most 50 tokens/s.
    assert m.decode_seconds >= 0.06
    speed = m.tokens_per_second_per_request
    assert speed is not None and speed <= 50.0
    # Time per output token as vLLM records it: the one-token answer counts 0.
    tpot = [
        s
        for f in text_string_to_metric_families(text)
        for s in f.samples
        if s.name.startswith("vllm:request_time_per_output_token_seconds")
    ]
    buckets = {s.labels.get("le"): s.value for s in tpot if s.name.endswith("_bucket")}
    assert buckets["0.01"] == 1 and buckets["+Inf"] == 2
    assert {s.labels["model_name"] for s in tpot} == {"m"}

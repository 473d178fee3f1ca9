"""A serving pod is the tenant's: its answers must not steer or leak through the operator.

The "pod" here is a small HTTP server that answers like a hostile tenant would; the
"internal service" is a second local server standing in for an address only the operator
can reach (cloud metadata, the Kubernetes API).
"""

from __future__ import annotations

import json
import logging
import unicodedata
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from finetune_operator.clients.vllm import (
    REASON_MAX_CHARS,
    VllmClient,
    VllmError,
    VllmErrorKind,
    sanitize_reason,
)

SECRET = "AKIAIOSFODNN7EXAMPLE-metadata-token"
API_KEY = "sk-operator-key-7d41e0"

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


@asynccontextmanager
async def http_server(handler: Handler) -> AsyncIterator[tuple[str, list[str]]]:
    """A server answering every request with ``handler``; yields (URL, requests seen)."""
    seen: list[str] = []

    async def record(request: web.Request) -> web.StreamResponse:
        seen.append(f"{request.method} {request.path} {request.headers.get('Authorization')}")
        return await handler(request)

    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", record)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    try:
        yield f"http://127.0.0.1:{port}", seen
    finally:
        await runner.cleanup()


async def internal_service(_: web.Request) -> web.Response:
    return web.json_response({"error": {"message": SECRET}, "token": SECRET})


CALLS: dict[str, Callable[[VllmClient, str], Awaitable[Any]]] = {
    "load": lambda c, ep: c.load_adapter(ep, "a", "/adapters/a"),
    "reload": lambda c, ep: c.load_adapter(ep, "a", "/adapters/a", replace=True),
    "unload": lambda c, ep: c.unload_adapter(ep, "a"),
    "models": lambda c, ep: c.loaded_adapters(ep),
    "metrics": lambda c, ep: c.metrics(ep),
    "smoke": lambda c, ep: c.smoke(ep, "a", "hi"),
}


@pytest.mark.parametrize("status", [301, 302, 303, 307, 308])
@pytest.mark.parametrize("call", sorted(CALLS))
async def test_redirects_to_internal_addresses_are_not_followed(
    status: int, call: str, caplog: Any
) -> None:
    caplog.set_level(logging.DEBUG)
    async with http_server(internal_service) as (internal, internal_seen):

        async def redirect(_: web.Request) -> web.Response:
            return web.Response(
                status=status,
                headers={"Location": f"{internal}/latest/meta-data/iam"},
                text=f"moved, and here is a secret: {SECRET}",
            )

        async with http_server(redirect) as (pod, pod_seen), aiohttp.ClientSession() as session:
            client = VllmClient(session, timeout=5, api_key=API_KEY)
            try:
                result = await CALLS[call](client, pod)
            except VllmError as exc:
                kind, text = exc.kind, str(exc)
            else:  # smoke reports instead of raising
                kind, text = result.kind, str(result.error)
    assert pod_seen, "the pod was asked"
    assert internal_seen == []  # the internal service received nothing
    assert kind is VllmErrorKind.REDIRECT
    for leak in (SECRET, internal, "meta-data", API_KEY):
        assert leak not in text and leak not in caplog.text


HOSTILE_MESSAGES = [
    "\x1b[31mLoRA rank 64\x1b[0m is greater than max_lora_rank 16.\r\nSet-Cookie: x=y",
    "ok\u202eevil\u200b text\x00\x07",
    "A" * 100_000,
]


@pytest.mark.parametrize("message", HOSTILE_MESSAGES, ids=["ansi-crlf", "bidi-nul", "huge"])
async def test_error_reasons_are_bounded_and_sanitized(message: str) -> None:
    async def answer(_: web.Request) -> web.Response:
        body = {"error": {"message": message, "type": "BadRequestError", "secret": SECRET}}
        return web.json_response(body, status=400)

    async with http_server(answer) as (pod, _), aiohttp.ClientSession() as session:
        client = VllmClient(session, timeout=5)
        with pytest.raises(VllmError) as err:
            await client.load_adapter(pod, "a", "/adapters/a")
        smoke = await client.smoke(pod, "a", "hi")
    reason = err.value.message
    assert len(reason) <= REASON_MAX_CHARS
    assert not any(unicodedata.category(ch).startswith("C") for ch in reason), repr(reason)
    assert SECRET not in str(err.value) and SECRET not in (smoke.error or "")
    assert smoke.error is not None and len(smoke.error) <= REASON_MAX_CHARS + 20
    if message.startswith("\x1b"):
        # vLLM's words still get through, so the condition says what to fix.
        assert err.value.kind is VllmErrorKind.RANK_TOO_HIGH
        assert "LoRA rank 64" in reason


@pytest.mark.parametrize(
    ("content_type", "body"),
    [
        ("text/html", f"<html><body>Internal error. {SECRET}</body></html>"),
        ("application/json", json.dumps({"message": SECRET, "detail": SECRET})),
        ("application/json", json.dumps({"error": SECRET})),
        ("text/plain", SECRET * 2000),
    ],
    ids=["html", "json-without-error-message", "error-string", "huge-text"],
)
async def test_only_vllm_error_messages_are_kept(content_type: str, body: str) -> None:
    async def answer(_: web.Request) -> web.Response:
        return web.Response(status=500, text=body, content_type=content_type)

    async with http_server(answer) as (pod, _), aiohttp.ClientSession() as session:
        client = VllmClient(session, timeout=5)
        with pytest.raises(VllmError) as err:
            await client.load_adapter(pod, "a", "/adapters/a")
        smoke = await client.smoke(pod, "a", "hi")
    assert err.value.kind is VllmErrorKind.SERVER_ERROR and not err.value.permanent
    assert err.value.message == "no reason given"
    assert SECRET not in str(err.value) and SECRET not in (smoke.error or "")


async def test_vllm_scaling_answer_is_shown_and_retried() -> None:
    # vLLM's ScalingMiddleware answers 503 with a bare string, not an ErrorResponse.
    async def answer(_: web.Request) -> web.Response:
        body = {"error": "The model is currently scaling. Please try again later."}
        return web.json_response(body, status=503)

    async with http_server(answer) as (pod, _), aiohttp.ClientSession() as session:
        with pytest.raises(VllmError) as err:
            await VllmClient(session, timeout=5).load_adapter(pod, "a", "/adapters/a")
    assert err.value.kind is VllmErrorKind.SERVER_ERROR and not err.value.permanent
    assert err.value.message == "The model is currently scaling. Please try again later."


async def test_oversized_answers_are_refused() -> None:
    huge = json.dumps({"data": [{"id": "x" * 1000, "parent": "b"}] * 10_000})  # ~10 MB

    async def answer(_: web.Request) -> web.Response:
        return web.Response(text=huge, content_type="application/json")

    async with http_server(answer) as (pod, _), aiohttp.ClientSession() as session:
        with pytest.raises(VllmError) as err:
            await VllmClient(session, timeout=5).loaded_adapters(pod)
    assert err.value.kind is VllmErrorKind.BAD_RESPONSE
    assert "larger than" in err.value.message


async def test_answer_from_another_model_is_not_the_adapter() -> None:
    async def answer(_: web.Request) -> web.Response:
        return web.json_response(
            {"model": "base\x1b[2J" + SECRET * 10, "choices": [{"message": {"content": "x"}}]}
        )

    async with http_server(answer) as (pod, _), aiohttp.ClientSession() as session:
        outcome = await VllmClient(session, timeout=5).smoke(pod, "support", "hi")
    assert not outcome.ok and outcome.kind is VllmErrorKind.WRONG_MODEL
    assert "\x1b" not in (outcome.error or "") and len(outcome.error or "") < 160


async def test_api_key_goes_to_v1_routes_only() -> None:
    async def answer(request: web.Request) -> web.Response:
        if request.path == "/metrics":
            return web.Response(text="")
        return web.json_response({"object": "list", "data": []})

    async with http_server(answer) as (pod, seen), aiohttp.ClientSession() as session:
        client = VllmClient(session, timeout=5, api_key=API_KEY)
        await client.loaded_adapters(pod)
        await client.metrics(pod)
    assert seen == [f"GET /v1/models Bearer {API_KEY}", "GET /metrics None"]


def test_sanitize_reason() -> None:
    assert sanitize_reason("a\tb\n\nc\x00d") == "a b c d"
    assert sanitize_reason("x" * 500) == "x" * (REASON_MAX_CHARS - 1) + "…"

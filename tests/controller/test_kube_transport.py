"""The API client's own transport: TLS from the configuration, token refresh, failures.

A small aiohttp server plays the API server here (the embedded one speaks plain HTTP and
accepts any token); it answers ``GET /api/v1/namespaces/ns/configmaps/cm``.
"""

from __future__ import annotations

import asyncio
import shutil
import socket
import ssl
import subprocess
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web
from finetune_local import Emulator
from finetune_operator.clients.kube import KubeClient, KubeError
from kubernetes import client

CONFIGMAP = {"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "cm"}}


def _certificates(folder: Path) -> tuple[Path, Path, Path]:
    """A CA and a server certificate for 127.0.0.1 signed by it (openssl CLI)."""
    ca_key, ca_crt = folder / "ca.key", folder / "ca.crt"
    key, csr, crt = folder / "server.key", folder / "server.csr", folder / "server.crt"
    ext = folder / "san.ext"
    ext.write_text("subjectAltName=IP:127.0.0.1\n")

    def openssl(*args: str | Path) -> None:
        subprocess.run(["openssl", *map(str, args)], check=True, capture_output=True)

    openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-subj", "/CN=test-ca",
            "-keyout", ca_key, "-out", ca_crt)  # fmt: skip
    openssl("req", "-newkey", "rsa:2048", "-nodes", "-subj", "/CN=127.0.0.1",
            "-keyout", key, "-out", csr)  # fmt: skip
    openssl("x509", "-req", "-in", csr, "-CA", ca_crt, "-CAkey", ca_key, "-CAcreateserial",
            "-days", "1", "-extfile", ext, "-out", crt)  # fmt: skip
    return ca_crt, crt, key


class FakeApi:
    """Answers one ConfigMap; with ``token`` set, other bearer tokens get 401."""

    def __init__(self) -> None:
        self.token: str | None = None
        self.authorizations: list[str | None] = []

    async def handle(self, request: web.Request) -> web.Response:
        auth = request.headers.get("Authorization")
        self.authorizations.append(auth)
        if self.token is not None and auth != f"Bearer {self.token}":
            return web.json_response(
                {"kind": "Status", "reason": "Unauthorized", "message": "Unauthorized"}, status=401
            )
        return web.json_response(CONFIGMAP)


async def _serve(
    api: FakeApi, ssl_context: ssl.SSLContext | None = None
) -> tuple[web.AppRunner, str]:
    app = web.Application()
    app.router.add_get("/api/v1/namespaces/ns/configmaps/cm", api.handle)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0, ssl_context=ssl_context)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    scheme = "https" if ssl_context else "http"
    return runner, f"{scheme}://127.0.0.1:{port}"


@pytest.fixture
async def tls_server(tmp_path: Path) -> AsyncIterator[tuple[str, Path]]:
    if shutil.which("openssl") is None:
        pytest.skip("needs the openssl command")
    ca_crt, crt, key = _certificates(tmp_path)
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(crt, key)
    runner, url = await _serve(FakeApi(), context)
    yield url, ca_crt
    await runner.cleanup()


async def test_tls_is_verified_against_the_configured_ca(tls_server: tuple[str, Path]) -> None:
    url, ca_crt = tls_server
    trusted = KubeClient(client.ApiClient(client.Configuration(host=url, ssl_ca_cert=str(ca_crt))))
    try:
        assert await trusted.get("ConfigMap", "ns", "cm") == CONFIGMAP
    finally:
        await trusted.close()

    # The system's CAs do not know this server: refused, reported as unreachable.
    untrusting = KubeClient(client.ApiClient(client.Configuration(host=url)))
    try:
        with pytest.raises(KubeError) as info:
            await untrusting.get("ConfigMap", "ns", "cm")
        assert info.value.status == 0 and info.value.reason == "Unreachable"
        assert "certificate" in info.value.message.lower()
    finally:
        await untrusting.close()


async def test_verification_can_be_turned_off(tls_server: tuple[str, Path]) -> None:
    url, _ca = tls_server
    configuration = client.Configuration(host=url)
    configuration.verify_ssl = False
    kube = KubeClient(client.ApiClient(configuration))
    try:
        assert await kube.get("ConfigMap", "ns", "cm") == CONFIGMAP
    finally:
        await kube.close()


async def test_expired_token_is_refreshed_after_a_401() -> None:
    api = FakeApi()
    runner, url = await _serve(api)
    tokens = iter(["old", "new", "newer"])
    refreshes: list[str] = []

    def refresh(configuration: Any) -> None:
        token = next(tokens)
        refreshes.append(token)
        configuration.api_key = {"BearerToken": token}

    configuration = client.Configuration(host=url)
    # As the kubeconfig and in-cluster loaders leave it: a token, a prefix and a refresh hook.
    configuration.api_key = {"BearerToken": "loaded"}
    configuration.api_key_prefix = {"BearerToken": "Bearer"}
    configuration.refresh_api_key_hook = refresh
    kube = KubeClient(client.ApiClient(configuration))
    try:
        api.token = "old"
        for _ in range(3):
            assert await kube.get("ConfigMap", "ns", "cm") == CONFIGMAP
        # The header is reused between refreshes: one refresh for three requests.
        assert refreshes == ["old"]
        api.token = "new"  # the server rotated it: 401, refresh, same request again
        assert await kube.get("ConfigMap", "ns", "cm") == CONFIGMAP
        assert refreshes == ["old", "new"]
        assert api.authorizations[-2:] == ["Bearer old", "Bearer new"]
        api.token = "something else"  # a refresh that does not help: the 401 is reported
        with pytest.raises(KubeError) as info:
            await kube.get("ConfigMap", "ns", "cm")
        assert info.value.status == 401
    finally:
        await kube.close()
        await runner.cleanup()


async def test_unreachable_server_is_a_kube_error() -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]  # closed again below: nothing listens there
    kube = KubeClient.from_url(f"http://127.0.0.1:{port}")
    try:
        with pytest.raises(KubeError) as info:
            await kube.get("ConfigMap", "ns", "cm")
        assert info.value.status == 0 and info.value.reason == "Unreachable"
        assert "GET /api/v1/namespaces/ns/configmaps/cm" in info.value.message
    finally:
        await kube.close()


def test_one_client_serves_successive_event_loops(emulator: Emulator) -> None:
    """Tests and the embedded demo reuse a client across loops: each gets its own session."""
    emulator.create({**CONFIGMAP, "metadata": {"name": "cm", "namespace": "ns"}})
    kube = KubeClient.from_url(str(emulator.url))

    async def once() -> dict[str, Any] | None:
        try:
            return await kube.get("ConfigMap", "ns", "cm")
        finally:
            await kube.close()

    for _ in range(2):
        found = asyncio.run(once())
        assert found is not None and found["metadata"]["name"] == "cm"

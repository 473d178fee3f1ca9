from __future__ import annotations

from collections.abc import Iterator

import pytest
from finetune_operator.serving_config import SETTINGS, annotation_endpoint
from k8s_fixtures import emulator, operator_runner  # noqa: F401


@pytest.fixture
def fast_serving_settings() -> Iterator[None]:
    """Poll quickly and reach "pods" through the local endpoint annotation."""
    saved = (SETTINGS.poll_seconds, SETTINGS.endpoint_resolver, SETTINGS.http_timeout_seconds)
    SETTINGS.poll_seconds = 0.1
    SETTINGS.endpoint_resolver = annotation_endpoint
    SETTINGS.http_timeout_seconds = 5.0
    yield
    SETTINGS.poll_seconds, SETTINGS.endpoint_resolver, SETTINGS.http_timeout_seconds = saved

"""`finetune-operator cleanup` against the embedded API: after the operator is gone, objects
held by its finalizer can be deleted again (and so can the CRDs); nothing else is touched."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml
from finetune_local import Emulator
from finetune_operator.builders.names import FINALIZER
from finetune_operator.cli import main
from support.cluster import NS, add_prerequisites, ftj_body, operator, wait_job
from support.ftj_samples import spec
from support.k8s_fixtures import wait_for

OTHER = "example.com/keep-me"


def kubeconfig(emulator: Emulator, folder: Path) -> str:
    path = folder / "kubeconfig"
    path.write_text(
        yaml.safe_dump(
            {
                "apiVersion": "v1",
                "kind": "Config",
                "clusters": [{"name": "e", "cluster": {"server": str(emulator.url)}}],
                "users": [{"name": "u", "user": {"token": "t"}}],
                "contexts": [{"name": "c", "context": {"cluster": "e", "user": "u"}}],
                "current-context": "c",
            }
        )
    )
    return str(path)


def finalizers(emulator: Emulator, plural: str, name: str) -> list[str] | None:
    obj = emulator.read(plural, NS, name)
    return None if obj is None else list(obj["metadata"].get("finalizers") or [])


def adapter_deployment(name: str) -> dict[str, Any]:
    return {
        "apiVersion": "finetune.dev/v1alpha1",
        "kind": "AdapterDeployment",
        "metadata": {"name": name, "namespace": NS, "finalizers": [FINALIZER, OTHER]},
        "spec": {},
    }


@pytest.fixture
def stranded(emulator: Emulator) -> Emulator:
    """Two jobs the operator handled, then the operator uninstalled; one job and one
    AdapterDeployment (with another controller's finalizer too) deleted after that."""
    add_prerequisites(emulator)
    with operator(emulator):
        for name in ("gone", "live"):
            emulator.create(ftj_body(name, spec()), keep_status=False)
            wait_job(emulator, f"{name}-train-g1")
            wait_for(lambda n=name: FINALIZER in (finalizers(emulator, "finetunejobs", n) or []))
    emulator.create(adapter_deployment("support"))
    emulator.request_delete("finetunejobs", NS, "gone")
    emulator.request_delete("adapterdeployments", NS, "support")
    assert finalizers(emulator, "finetunejobs", "gone") == [FINALIZER]  # stuck
    return emulator


def test_cleanup_releases_objects_being_deleted_and_nothing_else(
    stranded: Emulator, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    config = kubeconfig(stranded, tmp_path)
    assert main(["cleanup", "--kubeconfig", config, "--dry-run"]) == 0
    assert finalizers(stranded, "finetunejobs", "gone") == [FINALIZER]  # a dry run changes nothing
    assert "would release FineTuneJob default/gone (being deleted)" in capsys.readouterr().out

    assert main(["cleanup", "--kubeconfig", config]) == 0
    out = capsys.readouterr().out
    assert "released FineTuneJob default/gone (being deleted: now removed)" in out
    assert "released AdapterDeployment default/support" in out
    assert "2 object(s) released" in out
    assert stranded.read("finetunejobs", NS, "gone") is None
    # Another controller's finalizer stays: that object waits for its own controller.
    assert finalizers(stranded, "adapterdeployments", "support") == [OTHER]
    # A job not being deleted keeps the finalizer unless --all asks.
    assert finalizers(stranded, "finetunejobs", "live") == [FINALIZER]


def test_cleanup_all_before_deleting_the_crds(
    stranded: Emulator, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    config = kubeconfig(stranded, tmp_path)
    assert main(["cleanup", "--kubeconfig", config, "--all", "-n", NS]) == 0
    out = capsys.readouterr().out
    assert "released FineTuneJob default/live (kept, without the finalizer)" in out
    assert finalizers(stranded, "finetunejobs", "live") == []
    assert stranded.read("finetunejobs", NS, "gone") is None
    # Running it again finds nothing left to do.
    assert main(["cleanup", "--kubeconfig", config, "--all"]) == 0
    assert "0 object(s) released" in capsys.readouterr().out


def test_cleanup_in_a_namespace_without_objects(
    emulator: Emulator, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["cleanup", "--kubeconfig", kubeconfig(emulator, tmp_path), "-n", "empty"]) == 0
    assert "0 object(s) released" in capsys.readouterr().out

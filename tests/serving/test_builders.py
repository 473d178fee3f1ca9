"""Deployment patches, canary copies and restore patches for serving adapters."""

from __future__ import annotations

import copy

import jsonpatch
import pytest
from finetune_operator.builders import serving as b
from finetune_operator.serving import vllm_args

IMAGE = "ghcr.io/finetune/trainer:1"
DIGEST_A = "sha256:" + "a" * 64
DIGEST_B = "sha256:" + "b" * 64


def deployment(args: list[str] | None = None, rv: str = "7") -> dict:
    return {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": {"name": "llm", "namespace": "ml", "resourceVersion": rv, "uid": "u1"},
        "spec": {
            "replicas": 2,
            "selector": {"matchLabels": {"app": "llm"}},
            "template": {
                "metadata": {"labels": {"app": "llm"}},
                "spec": {
                    "containers": [
                        {"name": "sidecar", "image": "busybox"},
                        {
                            "name": "vllm",
                            "image": "vllm/vllm-openai",
                            "command": ["vllm", "serve"],
                            "args": args or ["meta-llama/Llama-3-8B", "--enable-lora"],
                        },
                    ]
                },
            },
        },
    }


def test_names_are_dns_safe_and_distinct() -> None:
    assert b.owned_suffix("support-bot") == "support-bot"
    a, c = b.owned_suffix("Support.Bot"), b.owned_suffix("Support_Bot")
    assert a != c
    long = b.owned_suffix("x" * 128)
    assert len(long) <= 40
    assert len(b.digest_annotation("y" * 128).split("/", 1)[1]) <= 63
    assert len(b.canary_name("z" * 63)) <= 63


@pytest.mark.parametrize(
    ("uri", "path", "kind"),
    [
        ("pvc://adapters/team/support-v3", "/finetune/adapters/support", "persistentVolumeClaim"),
        ("file:///models/adapters/support", "/models/adapters/support", None),
        ("s3://bucket/adapters/support", "/finetune/adapters/support", "emptyDir"),
        ("hf://org/support-lora@abc", "/finetune/adapters/support", "emptyDir"),
    ],
)
def test_placement(uri: str, path: str, kind: str | None) -> None:
    ref = b.AdapterRef("support", uri, DIGEST_A, credentials_secret="s3-creds")
    place = b.placement(ref, IMAGE)
    assert place.path == path
    if kind is None:
        assert place.volume is None and place.init_container is None
        return
    assert kind in place.volume
    assert place.mount["readOnly"] is True
    if kind == "persistentVolumeClaim":
        assert place.volume["persistentVolumeClaim"] == {"claimName": "adapters", "readOnly": True}
        assert place.mount["subPath"] == "team/support-v3"
        assert place.init_container is None
    else:
        init = place.init_container
        assert init["command"] == ["python", "-m", "finetune_trainer.fetch"]
        assert init["args"] == [
            "--uri",
            uri,
            "--dest",
            "/finetune/fetch/adapter",
            "--digest",
            DIGEST_A,
        ]
        assert init["envFrom"] == [{"secretRef": {"name": "s3-creds"}}]
        assert init["securityContext"]["readOnlyRootFilesystem"] is True
        # The server sees only the fetched adapter, not the fetch step's HOME.
        assert place.mount["subPath"] == "adapter"


def apply(dep: dict, ops: list[dict]) -> dict:
    return jsonpatch.apply_patch(dep, ops)


def test_rollout_patch_adds_only_owned_entries() -> None:
    dep = deployment(["m", "--enable-lora", "--lora-modules", "other=/o"])
    ref = b.AdapterRef("support", "pvc://adapters/support", DIGEST_A)
    ops = b.rollout_patch(dep, "vllm", "support", ref, owner="adep-1", fetch_image=IMAGE)
    assert ops[0] == {"op": "test", "path": "/metadata/resourceVersion", "value": "7"}
    out = apply(dep, ops)
    tpl = out["spec"]["template"]
    vllm = tpl["spec"]["containers"][1]
    mods = vllm_args.parse_container(vllm).lora_modules
    assert [(m.name, m.path) for m in mods] == [
        ("other", "/o"),
        ("support", "/finetune/adapters/support"),
    ]
    assert tpl["spec"]["containers"][0] == {"name": "sidecar", "image": "busybox"}
    assert tpl["metadata"]["annotations"] == {b.digest_annotation("support"): DIGEST_A}
    assert tpl["metadata"]["labels"] == {"app": "llm"}
    assert out["metadata"]["annotations"] == {b.owner_annotation("support"): "adep-1"}
    assert [v["name"] for v in tpl["spec"]["volumes"]] == ["adapter-support"]


def test_new_digest_same_path_changes_the_template() -> None:
    ref_a = b.AdapterRef("support", "pvc://adapters/support", DIGEST_A)
    ref_b = b.AdapterRef("support", "pvc://adapters/support", DIGEST_B)
    first = apply(
        deployment(),
        b.rollout_patch(deployment(), "vllm", "support", ref_a, owner="x", fetch_image=IMAGE),
    )
    first["metadata"]["resourceVersion"] = "8"
    ops = b.rollout_patch(first, "vllm", "support", ref_b, owner="x", fetch_image=IMAGE)
    non_test = [op for op in ops if op["op"] != "test"]
    # Only the digest annotation changes: args, volumes and owner are already right.
    assert len(non_test) == 1 and non_test[0]["value"] == DIGEST_B
    # Applying the same revision again changes nothing.
    same = b.rollout_patch(first, "vllm", "support", ref_a, owner="x", fetch_image=IMAGE)
    assert not b.patch_changes_anything(same)


def test_restore_to_nothing_removes_every_owned_entry() -> None:
    dep = deployment(["m", "--enable-lora", "--lora-modules", "other=/o"])
    ref = b.AdapterRef("support", "s3://bucket/support", DIGEST_A)
    rolled = apply(dep, b.rollout_patch(dep, "vllm", "support", ref, owner="x", fetch_image=IMAGE))
    assert (
        rolled["spec"]["template"]["spec"]["initContainers"][0]["name"] == "fetch-adapter-support"
    )
    restored = apply(
        rolled, b.rollout_patch(rolled, "vllm", "support", None, owner="x", fetch_image=IMAGE)
    )
    tpl = restored["spec"]["template"]
    assert tpl["spec"]["containers"][1]["args"] == [
        "m",
        "--enable-lora",
        "--lora-modules",
        "other=/o",
    ]
    assert tpl["spec"]["volumes"] == []
    assert tpl["spec"]["initContainers"] == []
    assert tpl["spec"]["containers"][1]["volumeMounts"] == []
    assert tpl["metadata"]["annotations"] == {}
    assert restored["metadata"]["annotations"] == {}


def test_stale_resource_version_fails_the_test_op() -> None:
    dep = deployment()
    ref = b.AdapterRef("support", "pvc://adapters/support", DIGEST_A)
    ops = b.rollout_patch(dep, "vllm", "support", ref, owner="x", fetch_image=IMAGE)
    newer = copy.deepcopy(dep)
    newer["metadata"]["resourceVersion"] = "9"
    with pytest.raises(jsonpatch.JsonPatchTestFailed):
        apply(newer, ops)


def test_server_arg_changes_are_applied() -> None:
    dep = deployment(["m"])
    ref = b.AdapterRef("support", "file:///a", DIGEST_A, rank=64)
    changes = b.ServerArgChanges(enable_lora=True, max_lora_rank=64, max_loras=2)
    out = apply(
        dep,
        b.rollout_patch(dep, "vllm", "support", ref, owner="x", fetch_image=IMAGE, changes=changes),
    )
    parsed = vllm_args.parse_container(out["spec"]["template"]["spec"]["containers"][1])
    assert (parsed.enable_lora, parsed.max_lora_rank, parsed.max_loras) == (True, 64, 2)


def test_unknown_container_is_named() -> None:
    with pytest.raises(ValueError, match="have: sidecar, vllm"):
        b.rollout_patch(deployment(), "server", "a", None, owner="x", fetch_image=IMAGE)


def test_canary_deployment() -> None:
    target = deployment(["m", "--enable-lora", "--lora-modules", "support=/old"])
    adep = {"metadata": {"name": "support", "namespace": "ml", "uid": "adep-uid"}}
    ref = b.AdapterRef("support", "pvc://adapters/v2", DIGEST_B)
    canary = b.canary_deployment(target, adep, "vllm", ref, replicas=1, fetch_image=IMAGE)
    assert canary["metadata"]["name"] == "support-canary"
    assert canary["metadata"]["ownerReferences"][0]["uid"] == "adep-uid"
    assert canary["metadata"]["ownerReferences"][0]["controller"] is True
    assert canary["spec"]["replicas"] == 1
    assert canary["spec"]["selector"]["matchLabels"] == {"app": "llm", b.CANARY_LABEL: "support"}
    tpl = canary["spec"]["template"]
    # The Service selector (app=llm) still matches the canary pods.
    assert tpl["metadata"]["labels"]["app"] == "llm"
    mods = vllm_args.parse_container(tpl["spec"]["containers"][1]).lora_modules
    assert [(m.name, m.path) for m in mods] == [("support", "/finetune/adapters/support")]
    assert "resourceVersion" not in canary["metadata"]
    # The target itself is untouched.
    assert target["spec"]["template"]["spec"]["containers"][1]["args"][-1] == "support=/old"

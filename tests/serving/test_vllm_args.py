"""Parsing and editing vLLM server command lines."""

from __future__ import annotations

import json

import pytest
from finetune_operator.serving import vllm_args as va


@pytest.mark.parametrize(
    ("container", "model", "enable", "rank", "loras", "modules"),
    [
        (
            {"command": ["vllm", "serve"], "args": ["meta-llama/Llama-3-8B", "--enable-lora"]},
            "meta-llama/Llama-3-8B",
            True,
            16,
            1,
            [],
        ),
        (
            {
                "command": ["python3", "-m", "vllm.entrypoints.openai.api_server"],
                "args": [
                    "--model=/models/llama",
                    "--enable-lora",
                    "--max-lora-rank",
                    "64",
                    "--max-loras=4",
                    "--lora-modules",
                    "a=/adapters/a",
                    '{"name":"b","path":"/adapters/b","base_model_name":"llama"}',
                    "--port",
                    "8000",
                ],
            },
            "/models/llama",
            True,
            64,
            4,
            [("a", "/adapters/a", None), ("b", "/adapters/b", "llama")],
        ),
        (
            {
                "args": [
                    "/usr/local/bin/vllm",
                    "serve",
                    "m",
                    "--lora-modules=x=/p",
                    "--no-enable-lora",
                ]
            },
            "m",
            False,
            16,
            1,
            [("x", "/p", None)],
        ),
        (
            # Repeated flag: argparse keeps the last occurrence.
            {
                "command": ["vllm"],
                "args": [
                    "serve",
                    "m",
                    "--enable-lora",
                    "--lora-modules",
                    "old=/o",
                    "--lora-modules",
                    "new=/n",
                    "--max-lora-rank",
                    "8",
                    "--max-lora-rank",
                    "32",
                ],
            },
            "m",
            True,
            32,
            1,
            [("new", "/n", None)],
        ),
    ],
)
def test_parse(container, model, enable, rank, loras, modules) -> None:
    parsed = va.parse_container(container)
    assert parsed.is_openai_server
    assert parsed.model == model
    assert parsed.enable_lora is enable
    assert parsed.max_lora_rank == rank
    assert parsed.max_loras == loras
    assert [(m.name, m.path, m.base_model_name) for m in parsed.lora_modules] == modules


@pytest.mark.parametrize(
    "container",
    [
        {"command": ["python", "app.py"]},
        {"command": ["/bin/sh", "-c", "python app.py --enable-lora"]},
        {"image": "example.com/my-server:1", "args": ["--enable-lora"]},  # not a vLLM image
    ],
)
def test_not_a_vllm_server(container) -> None:
    assert not va.parse_container(container).is_openai_server
    with pytest.raises(va.ServerArgsError, match="vllm serve"):
        va.set_lora_module(container, va.LoraModule("a", "/p"))


def test_served_model_name_is_the_base_name() -> None:
    parsed = va.parse_container(
        {"command": ["vllm", "serve", "/models/x", "--served-model-name", "llama", "llama-3"]}
    )
    assert parsed.base_model_names == ["llama", "llama-3"]


def test_set_keeps_other_adapters_byte_for_byte() -> None:
    other = '{"name": "team-b", "path": "/adapters/b"}'  # spaces kept as written
    container = {
        "name": "vllm",
        "command": ["vllm", "serve"],
        "args": ["m", "--enable-lora", "--lora-modules", "team-a=/old", other, "--port", "8000"],
    }
    out = va.set_lora_module(container, va.LoraModule("team-a", "/new"))
    assert out["command"] == ["vllm", "serve"]
    assert out["args"] == [
        "m",
        "--enable-lora",
        "--lora-modules",
        "team-a=/new",
        other,
        "--port",
        "8000",
    ]
    assert out["name"] == "vllm"
    # The input was not mutated.
    assert container["args"][3] == "team-a=/old"


def test_add_when_absent_and_remove_back() -> None:
    container = {"command": ["vllm", "serve"], "args": ["m", "--enable-lora"]}
    added = va.set_lora_module(container, va.LoraModule("a", "/p/a", base_model_name="m"))
    assert added["args"][:2] == ["m", "--enable-lora"]
    assert added["args"][2] == "--lora-modules"
    assert json.loads(added["args"][3]) == {"name": "a", "path": "/p/a", "base_model_name": "m"}
    both = va.set_lora_module(added, va.LoraModule("b", "/p/b"))
    assert [m.name for m in va.parse_container(both).lora_modules] == ["a", "b"]
    only_b = va.remove_lora_module(both, "a")
    assert only_b["args"] == ["m", "--enable-lora", "--lora-modules", "b=/p/b"]
    # Removing the last entry removes the flag itself (an empty --lora-modules is invalid).
    assert va.remove_lora_module(only_b, "b")["args"] == ["m", "--enable-lora"]
    # Removing an absent entry is a no-op.
    assert va.remove_lora_module(container, "zzz") == container


def test_edit_flags_living_in_command() -> None:
    container = {
        "command": ["vllm", "serve", "m", "--enable-lora", "--lora-modules", "a=/a"],
        "args": ["--port", "8000"],
    }
    out = va.set_lora_module(container, va.LoraModule("b", "/b"))
    assert out["command"] == [
        "vllm",
        "serve",
        "m",
        "--enable-lora",
        "--lora-modules",
        "a=/a",
        "b=/b",
    ]
    assert out["args"] == ["--port", "8000"]


def test_inline_lora_flag_is_rewritten_in_place() -> None:
    container = {"command": ["vllm", "serve", "m", "--lora-modules=a=/a", "--enable-lora"]}
    out = va.set_lora_module(container, va.LoraModule("a", "/a2"))
    assert out["command"] == ["vllm", "serve", "m", "--lora-modules", "a=/a2", "--enable-lora"]


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (["m"], ["m", "--max-lora-rank", "64"]),
        (["m", "--max-lora-rank", "16"], ["m", "--max-lora-rank", "64"]),
        # The operator writes the two-word form every vLLM version parses, in place.
        (["m", "--max-lora-rank=16", "--x"], ["m", "--max-lora-rank", "64", "--x"]),
    ],
)
def test_set_max_lora_rank(args, expected) -> None:
    out = va.set_max_lora_rank({"command": ["vllm", "serve"], "args": args}, 64)
    assert out["args"] == expected


def test_enable_lora_and_max_loras() -> None:
    out = va.ensure_enable_lora({"command": ["vllm", "serve", "m", "--no-enable-lora"]})
    assert va.parse_container(out).enable_lora
    assert "--no-enable-lora" not in out["command"] + out["args"]
    out = va.set_max_loras(out, 3)
    assert va.parse_container(out).max_loras == 3


@pytest.mark.parametrize(("rank", "setting"), [(1, 1), (4, 8), (16, 16), (17, 32), (300, 320)])
def test_rank_setting_for(rank, setting) -> None:
    assert va.rank_setting_for(rank) == setting


def test_rank_above_vllm_maximum() -> None:
    with pytest.raises(va.ServerArgsError, match=r"lora\.r"):
        va.rank_setting_for(1024)


@pytest.mark.parametrize(
    ("adapter_base", "served", "same"),
    [
        ("hf://meta-llama/Llama-3-8B@main", ["meta-llama/Llama-3-8B"], True),
        ("hf://meta-llama/Llama-3-8B", ["/models/llama-3-8b"], True),
        ("pvc://models/base/qwen2-0.5b", ["Qwen/Qwen2-0.5B"], True),
        ("hf://meta-llama/Llama-3-8B", ["mistralai/Mistral-7B"], False),
        ("hf://meta-llama/Llama-3-8B", [], None),
    ],
)
def test_same_base_model(adapter_base, served, same) -> None:
    assert va.same_base_model(adapter_base, served) is same


def test_bad_lora_entry_is_reported() -> None:
    with pytest.raises(va.ServerArgsError, match="name=path or JSON"):
        va.parse_container({"command": ["vllm", "serve", "m", "--lora-modules", "oops"]})

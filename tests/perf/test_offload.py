"""Activation offload on the CPU: the hooks copy the checkpointed layer inputs into reusable
host buffers and back, and training is unchanged by it (same losses, same gradients)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest
from finetune_trainer import fastpath
from finetune_trainer.offload import (
    ActivationOffloader,
    container_memory_limit,
    host_memory_bytes,
    install,
    installed,
    uninstall,
)
from support.packed_training import TINY_LAYERS, packed_batch
from support.packed_training import tiny_lora_model as shared_tiny_lora_model

os.environ["HF_HUB_OFFLINE"] = "1"

LAYERS = TINY_LAYERS


def tiny_lora_model() -> Any:
    return shared_tiny_lora_model(gc=True)


def train(
    model: Any,
    steps: int,
    offloader: ActivationOffloader | None = None,
    sizes: list[int] | None = None,
) -> tuple[list[float], list[dict[str, Any]], list[Any]]:
    """A few optimiser steps; returns the losses, the gradients and the offloader's stats
    after every step."""
    import torch

    params = [p for p in model.parameters() if p.requires_grad]
    optim = torch.optim.AdamW(params, lr=1e-2)
    losses, grads, stats = [], [], []
    for step in range(steps):
        tokens = sizes[step] if sizes else 48
        loss = model(**packed_batch(step, tokens), use_cache=False).loss
        loss.backward()
        losses.append(float(loss))
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad})
        optim.step()
        optim.zero_grad(set_to_none=True)
        del loss
        if offloader is not None:
            stats.append(offloader.stats())
    return losses, grads, stats


def test_offloaded_training_gives_the_same_losses_and_gradients() -> None:
    import torch

    plain_losses, plain_grads, _ = train(tiny_lora_model(), 3)
    model = tiny_lora_model()
    offloader = ActivationOffloader(min_bytes=0)
    install(model, offloader)
    losses, grads, stats = train(model, 3, offloader)

    assert losses == plain_losses
    for want, got in zip(plain_grads, grads, strict=True):
        assert want.keys() == got.keys()
        assert all(torch.equal(want[n], got[n]) for n in want)
    # every checkpointed layer's input went out and came back, the next one ahead of time
    assert [s.offloaded for s in stats] == [LAYERS, 2 * LAYERS, 3 * LAYERS]
    assert [s.restored for s in stats] == [LAYERS, 2 * LAYERS, 3 * LAYERS]
    assert [s.prefetched for s in stats] == [(LAYERS - 1) * k for k in (1, 2, 3)]


def test_buffers_are_reused_and_nothing_is_kept_between_steps() -> None:
    model = tiny_lora_model()
    offloader = ActivationOffloader(min_bytes=0)
    install(model, offloader)
    # packed micro-batches vary in size: buffers grow to the largest, then stay
    _, _, stats = train(model, 5, offloader, sizes=[40, 64, 40, 64, 56])
    assert all(s.in_use == 0 for s in stats)
    assert all(s.buffers == LAYERS for s in stats)
    assert stats[1].allocations == stats[-1].allocations
    assert stats[-1].host_bytes == LAYERS * 64 * 32 * 4  # float32 here, bf16 on the GPU


def test_reserved_buffers_mean_no_allocation_during_training() -> None:
    model = tiny_lora_model()
    offloader = ActivationOffloader(min_bytes=0)
    offloader.reserve(LAYERS, 64 * 32 * 4)
    install(model, offloader)
    before = offloader.stats().allocations
    _, _, stats = train(model, 2, offloader, sizes=[64, 40])
    assert stats[-1].allocations == before == LAYERS


def test_a_forward_without_backward_returns_its_buffers() -> None:
    model = tiny_lora_model()
    offloader = ActivationOffloader(min_bytes=0)
    install(model, offloader)
    loss = model(**packed_batch(0), use_cache=False).loss
    assert offloader.stats().in_use == LAYERS
    del loss
    assert offloader.stats().in_use == 0


def test_small_inputs_stay_where_they_are() -> None:
    model = tiny_lora_model()
    offloader = ActivationOffloader()  # default: only inputs of 1 MiB and more move
    install(model, offloader)
    train(model, 1, offloader)
    assert offloader.stats().offloaded == 0


def test_install_survives_checkpointing_enabled_again_and_uninstall_undoes_it() -> None:
    model = tiny_lora_model()
    offloader = ActivationOffloader(min_bytes=0)
    install(model, offloader)
    assert installed(model) is offloader
    # what the Trainer does when training starts: every layer gets a new checkpoint function
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    train(model, 1, offloader)
    assert offloader.stats().offloaded == LAYERS
    uninstall(model)
    assert installed(model) is None
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    train(model, 1, offloader)
    assert offloader.stats().offloaded == LAYERS


def test_apply_installs_offload_when_asked(tmp_path: Path) -> None:
    model = tiny_lora_model()
    report = fastpath.apply(
        model,
        method="lora",
        lora_rank=4,
        max_seq_length=64,
        memory_budget_gib=1.0,
        activation_offload=True,
    )
    assert report.plan is not None and report.plan["activation_offload"] is True
    assert report.sft_overrides["gradient_checkpointing"] is True
    assert report.activation_offload is not None
    offloader = installed(model)
    assert offloader is not None and offloader.stats().buffers == LAYERS
    uninstall(model)
    plain = fastpath.apply(
        tiny_lora_model(), method="lora", lora_rank=4, max_seq_length=64, memory_budget_gib=1.0
    )
    assert plain.activation_offload is None


@pytest.mark.parametrize(
    ("v2", "v1", "want"),
    [
        ("max\n", None, None),
        ("17179869184\n", None, 16 * 1024**3),
        (None, "9223372036854771712\n", None),  # cgroup v1 without a limit
        (None, "8589934592\n", 8 * 1024**3),
        (None, None, None),
    ],
)
def test_container_memory_limit_from_cgroup(
    tmp_path: Path, v2: str | None, v1: str | None, want: int | None
) -> None:
    files = (tmp_path / "memory.max", tmp_path / "memory.limit_in_bytes")
    for path, text in zip(files, (v2, v1), strict=True):
        if text is not None:
            path.write_text(text)
    assert container_memory_limit(files) == want


def test_host_memory_prefers_the_limit_then_the_request_then_the_host(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    limit = tmp_path / "memory.max"
    meminfo = tmp_path / "meminfo"
    meminfo.write_text("MemTotal:       32768 kB\nMemFree: 1 kB\n")
    monkeypatch.delenv("FINETUNE_HOST_MEMORY_BYTES", raising=False)
    limit.write_text("max")
    assert host_memory_bytes((limit,), meminfo) == 32768 * 1024
    limit.write_text("1000000")
    assert host_memory_bytes((limit,), meminfo) == 1000000
    monkeypatch.setenv("FINETUNE_HOST_MEMORY_BYTES", "500000")
    assert host_memory_bytes((limit,), meminfo) == 500000
    limit.write_text("max")
    assert host_memory_bytes((limit,), meminfo) == 500000


def _sft_run(tmp_path: Path, offloader: ActivationOffloader | None) -> list[float]:
    """Five packed, checkpointed TRL steps on the tiny model; the logged losses."""
    import torch
    from datasets import Dataset
    from finetune_trainer.tinymodel import build_tiny_model
    from support.packed_training import PACKED_ROWS, packed_cpu_args, packed_lora_trainer
    from transformers import AutoModelForCausalLM

    model_dir = tmp_path / "model"
    if not model_dir.exists():
        build_tiny_model(model_dir, initializer_range=0.3)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    if offloader is not None:
        install(model, offloader)  # before the Trainer, as the fast path does
    rows = PACKED_ROWS
    dataset = Dataset.from_dict(
        {"input_ids": rows, "completion_mask": [[0] * 3 + [1] * (len(r) - 3) for r in rows]}
    )
    args = packed_cpu_args(tmp_path / "out", completion_only_loss=True, gradient_checkpointing=True)
    trainer = packed_lora_trainer(model, args, dataset)
    trainer.train()
    return [h["loss"] for h in trainer.state.log_history if "loss" in h]


@pytest.mark.slow
def test_a_trl_run_keeps_the_offload_it_was_given_and_trains_the_same(tmp_path: Path) -> None:
    # the Trainer enables checkpointing again when training starts: offload must survive it
    offloader = ActivationOffloader(min_bytes=0)
    offloaded = _sft_run(tmp_path, offloader)
    plain = _sft_run(tmp_path, None)
    stats = offloader.stats()
    assert stats.offloaded == stats.restored == 5 * 2  # five micro-batches, two layers
    assert stats.in_use == 0
    assert len(offloaded) == 5 and offloaded == pytest.approx(plain, rel=1e-6)


def test_each_training_process_plans_with_its_share_of_the_container(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("FINETUNE_HOST_MEMORY_BYTES", str(32 * 1024**3))
    monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
    whole = fastpath._host_memory_gib()
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "4")
    assert whole is not None and whole <= 32
    assert fastpath._host_memory_gib() == pytest.approx(whole / 4)

"""Compiled decoder layers (``finetune_trainer.compile_layers``) on the CPU.

The fast tests compile with ``aot_eager``: dynamo traces each layer body and AOT autograd
splits it into compiled forward and backward graphs, as with Inductor, but the graphs then run
PyTorch's own kernels instead of generated C++ (Inductor's C++ build takes about a minute on
this CI's two cores). So they check what compilation does to training (same losses, graphs
reused across layers and steps, checkpointing, offload and the fused dropout around compiled
layers, the fallback) without Inductor's code generation; the slow test runs Inductor itself
through the trainer's SFT trainer.

Losses are compared at a relative 1e-5: float32 throughout, and the traced graphs run the same
operations, but AOT autograd's decompositions may sum in another order (differences of about
1e-7 were seen); a wrong mask, a dropped LoRA term or a mixed-up layer moves the loss by 1e-3
or more.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from finetune_trainer import compile_layers, fastpath
from finetune_trainer import lora_dropout as ld
from finetune_trainer import train as trainer_module
from finetune_trainer.offload import ActivationOffloader, install
from support.packed_training import TINY_LAYERS, packed_batch, quantise_projections
from support.packed_training import tiny_lora_model as shared_tiny_lora_model

os.environ["HF_HUB_OFFLINE"] = "1"

LAYERS = TINY_LAYERS
# Packed micro-batches of varying length; the last steps reuse lengths' graphs.
SIZES = [40, 64, 52, 48, 70, 33, 58]


@pytest.fixture(autouse=True)
def fresh_compile_caches() -> None:
    """Each test counts its own compilations: nothing compiled by an earlier test is reused."""
    torch._dynamo.reset()


def tiny_lora_model(*, dropout: float = 0.0, gc: bool = False, four_bit_mlp: bool = False) -> Any:
    return shared_tiny_lora_model(
        dropout=dropout, gc=gc, prepare=quantise_projections if four_bit_mlp else None
    )


def train(model: Any, choice: Any = None) -> tuple[list[float], list[dict[str, Any]]]:
    """Optimiser steps over SIZES; the losses, and the compile counts after every step."""
    params = [p for p in model.parameters() if p.requires_grad]
    optim = torch.optim.AdamW(params, lr=1e-2)
    losses, counts = [], []
    for step, tokens in enumerate(SIZES):
        torch.manual_seed(step)  # the dropout masks of both runs come from the same seed
        loss = model(**packed_batch(step, tokens), use_cache=False).loss
        loss.backward()
        optim.step()
        optim.zero_grad(set_to_none=True)
        losses.append(float(loss.detach()))
        counts.append(choice.as_dict() if choice is not None else {})
    return losses, counts


def fails_on_attention(gm: torch.fx.GraphModule, example_inputs: Any) -> Callable[..., Any]:
    """A backend that compiles the start-up probe but fails on any graph with the attention
    (as a GPU backend might on one kernel)."""
    if "self_attn" in gm.code:
        raise RuntimeError("no kernel for this attention")
    return gm.forward


def off_by_half(gm: torch.fx.GraphModule, example_inputs: Any) -> Callable[..., Any]:
    """A backend that compiles and runs, but whose graphs return 1.5 times the right result."""

    def run(*args: Any) -> Any:
        return tuple(o * 1.5 if isinstance(o, torch.Tensor) else o for o in gm(*args))

    return run


for _backend in (fails_on_attention, off_by_half):
    if _backend.__name__ not in torch._dynamo.list_backends(exclude_tags=()):
        torch._dynamo.register_backend(_backend)


@pytest.fixture
def dynamo_log(caplog: pytest.LogCaptureFixture) -> Iterator[pytest.LogCaptureFixture]:
    """torch._dynamo's log records (its logger does not propagate to the root logger)."""
    logger = logging.getLogger("torch._dynamo")
    logger.addHandler(caplog.handler)
    try:
        yield caplog
    finally:
        logger.removeHandler(caplog.handler)


def compiled(model: Any) -> compile_layers.CompileChoice:
    choice = compile_layers.compile_decoder_layers(model, backend="aot_eager")
    assert choice.compiled, choice.note
    return choice


@pytest.mark.parametrize("gc", [False, True], ids=["no-checkpointing", "checkpointing"])
def test_compiled_layers_train_like_eager_and_stop_recompiling(gc: bool) -> None:
    eager, _ = train(tiny_lora_model(gc=gc))
    model = tiny_lora_model(gc=gc)
    choice = compiled(model)
    assert choice.layers == LAYERS and choice.layer_class == "LlamaDecoderLayer"
    losses, counts = train(model, choice)

    assert losses == pytest.approx(eager, rel=1e-5)
    last = counts[-1]
    assert last["graphBreaks"] == 0 and last["failedCompilations"] == 0
    # One body for every layer: a static graph for the first length, a dynamic one after the
    # first change, each at most twice (the first layer's input needs no gradient)...
    assert 1 <= last["recompilations"] < last["compilations"] <= 4
    # ... and once the length is dynamic, new lengths compile nothing more.
    assert counts[2]["compilations"] == last["compilations"]


def test_offload_and_the_fused_dropout_around_compiled_layers() -> None:
    def model() -> Any:
        net = tiny_lora_model(dropout=0.1, gc=True)
        assert ld.patch_model(net).patched
        install(net, ActivationOffloader(min_bytes=0))
        return net

    eager, _ = train(model())
    net = model()
    choice = compiled(net)
    losses, counts = train(net, choice)

    # The fused dropout runs as an operator inside the compiled layer, drawing from the same
    # generator in the same order: eager's masks, the same ones again for the recompute and
    # the backward pass.
    assert losses == pytest.approx(eager, rel=1e-5)
    assert counts[-1]["graphBreaks"] == 0 and 1 <= counts[-1]["compilations"] <= 4
    assert counts[2]["compilations"] == counts[-1]["compilations"]


def test_bitsandbytes_4bit_layers_compile_and_train_like_eager() -> None:
    pytest.importorskip("bitsandbytes")
    eager, _ = train(tiny_lora_model(four_bit_mlp=True))
    model = tiny_lora_model(four_bit_mlp=True)
    assert type(model.base_model.model.model.layers[0].mlp.up_proj).__module__.endswith("bnb")
    choice = compiled(model)
    losses, counts = train(model, choice)
    assert losses == pytest.approx(eager, rel=1e-5)
    # bitsandbytes registers its 4-bit matmul as a PyTorch operator: no graph break here
    assert counts[-1]["graphBreaks"] == 0 and counts[-1]["compilations"] >= 1
    assert counts[2]["compilations"] == counts[-1]["compilations"]


def test_compiling_twice_keeps_one_subclass_and_uncompile_restores_the_class() -> None:
    from transformers.models.llama.modeling_llama import LlamaDecoderLayer

    model = tiny_lora_model()
    compiled(model)
    layers = compile_layers.decoder_layers(model)
    first = type(layers[0])
    compiled(model)
    assert len(layers) == LAYERS and all(type(layer) is first for layer in layers)
    assert first is not LlamaDecoderLayer and issubclass(first, LlamaDecoderLayer)
    assert compile_layers.compiled_choice(model) is not None
    note = trainer_module._compiled_layers_note(model)  # what the trainer logs after training
    assert note is not None and "recompilations" in note and "graphBreaks" in note
    assert compile_layers.uncompile(model) == LAYERS
    assert all(type(layer) is LlamaDecoderLayer for layer in layers)


def test_a_backend_that_fails_leaves_the_model_eager_and_says_why() -> None:
    from transformers.models.llama.modeling_llama import LlamaDecoderLayer

    model = tiny_lora_model()
    report = fastpath.apply(
        model, method="lora", lora_rank=4, max_seq_length=64, memory_budget_gib=1.0,
        lora_dropout=0.0, compile_layers=True, compile_backend="no_such_backend",
    )  # fmt: skip
    assert report.compiled_layers is not None
    reported = report.as_dict()["compiled_layers"]
    assert reported["compiled"] is False and "no_such_backend" in reported["note"]
    assert all(type(m) is LlamaDecoderLayer for m in compile_layers.decoder_layers(model))
    losses, _ = train(model)  # and it trains
    assert len(losses) == len(SIZES)


def test_a_backend_whose_results_differ_from_eager_fails_the_probe() -> None:
    ok, why = compile_layers.compiler_works("aot_eager", torch.device("cpu"), torch.float32)
    assert ok, why
    ok, why = compile_layers.compiler_works("off_by_half", torch.device("cpu"), torch.float32)
    assert not ok and why.startswith("the compiled probe differs from eager"), why

    model = tiny_lora_model()
    choice = compile_layers.compile_decoder_layers(model, backend="off_by_half")
    assert not choice.compiled and choice.note.startswith("the compiled probe differs")
    assert compile_layers.compiled_choice(model) is None
    assert compile_layers.uncompile(model) == 0  # no layer was swapped


def test_a_layer_whose_compilation_fails_in_training_runs_eagerly_and_the_log_says_why(
    dynamo_log: pytest.LogCaptureFixture,
) -> None:
    eager, _ = train(tiny_lora_model())
    model = tiny_lora_model()
    choice = compile_layers.compile_decoder_layers(model, backend="fails_on_attention")
    assert choice.compiled, choice.note  # the probe has no attention: it passed
    with dynamo_log.at_level(logging.WARNING, logger="torch._dynamo"):
        losses, counts = train(model, choice)

    assert losses == pytest.approx(eager, rel=1e-5)
    assert counts[-1]["failedCompilations"] >= 1
    # the failed code is left eager for good: no new failure in later steps
    assert counts[2]["failedCompilations"] == counts[-1]["failedCompilations"]
    warnings = [r.getMessage() for r in dynamo_log.records if r.levelno == logging.WARNING]
    assert any("no kernel for this attention" in w for w in warnings), warnings
    note = trainer_module._compiled_layers_note(model)
    assert note is not None and f"failedCompilations {counts[-1]['failedCompilations']}" in note


def test_compile_is_off_by_default() -> None:
    model = tiny_lora_model()
    report = fastpath.apply(
        model, method="lora", lora_rank=4, max_seq_length=64, memory_budget_gib=1.0,
        lora_dropout=0.0,
    )  # fmt: skip
    assert compile_layers.COMPILE_DECODER_LAYERS is False
    assert report.compiled_layers is None and report.as_dict()["compiled_layers"] is None


@pytest.mark.slow
def test_inductor_compiled_layers_in_the_fast_trainer_log_eager_losses(tmp_path: Path) -> None:
    """TRL's packed training with the fast path's trainer and the fused LoRA dropout (0.1),
    Inductor-compiled layers against eager ones, gradient checkpointing on (about a minute on
    two cores: C++ code generation)."""
    from finetune_trainer.tinymodel import build_tiny_model
    from support.packed_training import packed_cpu_args, packed_lora_trainer
    from transformers import AutoModelForCausalLM

    model_dir = build_tiny_model(tmp_path / "model", initializer_range=0.3)

    def run(compile_: bool) -> tuple[list[float], dict[str, Any]]:
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
        args = packed_cpu_args(
            tmp_path / f"out-{compile_}", bf16=False, gradient_checkpointing=True
        )
        choice = compile_layers.compile_decoder_layers(model) if compile_ else None
        trainer = packed_lora_trainer(model, args, dropout=0.1)
        assert ld.patch_model(trainer.model).patched
        trainer.train()
        losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
        return losses, choice.as_dict() if choice is not None else {}

    eager, _ = run(False)
    losses, counts = run(True)
    assert counts["compiled"] and counts["backend"] == "inductor", counts
    assert len(eager) == 5 and losses == pytest.approx(eager, rel=1e-4)
    assert counts["graphBreaks"] == 0 and 1 <= counts["compilations"] <= 4
    assert counts["failedCompilations"] == 0

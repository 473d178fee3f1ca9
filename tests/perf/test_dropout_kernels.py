"""LoRA dropout drawn inside the adapter's matmuls (dropout_kernels.py), run by Triton's
interpreter on the CPU: each kernel computes its matmul with the mask it reports, the mask
is a function of (seed, row, column) alone and drops elements with probability p, and the
fused 4-bit projections that use the kernels train exactly like PEFT's layers given the same
masks, with and without gradient checkpointing."""

from __future__ import annotations

import os
import sys
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
import torch
from support.packed_training import TINY_LAYERS

pytest.importorskip("triton")
pytest.importorskip("bitsandbytes")
from finetune_trainer import lora_4bit
from support.packed_training import steps, tiny_4bit_model


@pytest.fixture
def kernels() -> ModuleType:
    """The kernels, interpreted on the CPU (tests/conftest.py sets ``TRITON_INTERPRET``)."""
    if os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("the kernels run on the CPU only under Triton's interpreter")
    from finetune_trainer import dropout_kernels

    return dropout_kernels


SMALL_TILE = {"BLOCK_T": 16, "BLOCK_K": 32, "num_warps": 4, "num_stages": 1}


def operands(rows: int, width: int, rank: int, dtype: torch.dtype) -> tuple[torch.Tensor, ...]:
    gen = torch.Generator().manual_seed(rows * width + rank)
    return tuple(
        torch.randn(shape, generator=gen).to(dtype)
        for shape in ((rows, width), (rank, width), (rows, rank), (rows, width))
    )


@pytest.mark.parametrize(
    ("rows", "width", "rank", "dtype", "tol"),
    [
        (100, 136, 8, torch.float32, 1e-5),  # rank below the 16 a block holds; ragged tiles
        (70, 96, 24, torch.float32, 1e-5),
        (64, 128, 16, torch.float16, 2e-3),
    ],
)
def test_each_kernel_computes_its_matmul_with_the_mask_it_reports(
    kernels: ModuleType, rows: int, width: int, rank: int, dtype: torch.dtype, tol: float
) -> None:
    x, a, g, base = operands(rows, width, rank, dtype)
    p, seed = 0.3, 2**40 + 17
    mask = kernels.keep_mask(rows, width, p, seed, "cpu")
    dropped = x.double() * mask * kernels.keep_scale(p)

    def close(got: torch.Tensor, want: torch.Tensor) -> None:
        scale = float(want.abs().max())
        assert float((got.double() - want).abs().max()) <= tol * scale

    close(kernels.project(x, a, p, seed), dropped @ a.double().t())
    close(kernels.grad_weight(g, x, p, seed), g.double().t() @ dropped)
    grad_in = (g.double() @ a.double()) * mask * kernels.keep_scale(p)
    close(kernels.grad_input(g, a, p, seed), grad_in)
    into = base.clone()
    returned = kernels.grad_input(g, a, p, seed, out=into)
    assert returned is into
    close(into, base.double() + grad_in)


def test_the_mask_depends_on_seed_row_and_column_only(
    kernels: ModuleType,
) -> None:
    x, a, g, _ = operands(50, 64, 8, torch.float32)
    p = 0.2
    assert torch.equal(
        kernels.keep_mask(50, 64, p, 5, "cpu"), kernels.keep_mask(50, 64, p, 5, "cpu")
    )
    # A row's mask is the same whichever rows come with it.
    assert torch.equal(
        kernels.keep_mask(50, 64, p, 5, "cpu")[:20], kernels.keep_mask(20, 64, p, 5, "cpu")
    )
    assert not torch.equal(
        kernels.keep_mask(50, 64, p, 5, "cpu"), kernels.keep_mask(50, 64, p, 6, "cpu")
    )
    # other tile sizes, same results
    torch.testing.assert_close(
        kernels.project(x, a, p, 5, tile=SMALL_TILE),
        kernels.project(x, a, p, 5),
        rtol=1e-5,
        atol=1e-5,
    )
    torch.testing.assert_close(
        kernels.grad_weight(g, x, p, 5, tile=SMALL_TILE),
        kernels.grad_weight(g, x, p, 5),
        rtol=1e-5,
        atol=1e-5,
    )
    torch.testing.assert_close(
        kernels.grad_input(g, a, p, 5, tile=SMALL_TILE), kernels.grad_input(g, a, p, 5)
    )


@pytest.mark.parametrize("p", [0.05, 0.5])
def test_each_element_is_dropped_with_probability_p_independently(
    kernels: ModuleType, p: float
) -> None:
    rows, width = 256, 512
    keep = kernels.keep_mask(rows, width, p, 1234, "cpu").double()
    n = keep.numel()
    kept = 1.0 - kernels.threshold(p) / 65536
    assert abs(kept - (1 - p)) < 2**-16
    sigma = (kept * (1 - kept) / n) ** 0.5
    assert abs(float(keep.mean()) - kept) < 5 * sigma
    # Neighbours share a Philox call (eight elements per counter) and rows share counters'
    # column parts: the pairs must still be kept independently.
    for left, right in (
        (keep[:, :-1], keep[:, 1:]),
        (keep[:, 0::8], keep[:, 7::8]),
        (keep[:-1], keep[1:]),
    ):
        both = float((left * right).mean())
        pair_sigma = (kept**2 * (1 - kept**2) / left.numel()) ** 0.5
        assert abs(both - kept**2) < 5 * pair_sigma
    # every column and row is dropped at about the same rate
    assert float(keep.mean(0).std()) < 4 * (kept * (1 - kept) / rows) ** 0.5


def test_probabilities_outside_the_open_interval_are_refused(
    kernels: ModuleType,
) -> None:
    for p in (0.0, 1.0, -0.1):
        with pytest.raises(ValueError, match="dropout probability"):
            kernels.threshold(p)
    assert kernels.keep_scale(0.05) * (1 - kernels.threshold(0.05) / 65536) == pytest.approx(1.0)


def test_shapes_the_kernels_cannot_take_are_refused(
    kernels: ModuleType,
) -> None:
    x, a, _, _ = operands(10, 20, 4, torch.float32)  # width 20 is not a multiple of 8
    with pytest.raises(ValueError, match="multiple of 8"):
        kernels.project(x, a, 0.1, 1)
    x, a, _, _ = operands(10, 24, 4, torch.float32)
    with pytest.raises(ValueError, match="weight"):
        kernels.project(x, a[:, :16], 0.1, 1)


class KernelMaskDropout(torch.nn.Module):
    """PEFT's dropout slot filled with the kernels' masks, drawn from the same seeds."""

    def __init__(self, kernels: ModuleType, p: float) -> None:
        super().__init__()
        self.kernels, self.p = kernels, p

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training:
            return x
        dropped: torch.Tensor = self.kernels.reference_dropout(
            x, self.p, lora_4bit.draw_seed(x.device)
        )
        return dropped


def with_kernel_masks(model: Any, kernels: ModuleType, p: float) -> Any:
    for module in model.modules():
        dropouts = getattr(module, "lora_dropout", None)
        if isinstance(dropouts, torch.nn.ModuleDict):
            for name in list(dropouts):
                dropouts[name] = KernelMaskDropout(kernels, p)
    return model


@pytest.mark.parametrize("gc", [False, True], ids=["eager", "checkpointed"])
def test_fused_projections_with_the_kernels_train_like_peft_with_their_masks(
    kernels: ModuleType, gc: bool
) -> None:
    p = 0.3
    reference = with_kernel_masks(tiny_4bit_model(dropout=p, gc=gc), kernels, p)
    fused = tiny_4bit_model(dropout=p, gc=gc)
    report = lora_4bit.patch_model(fused, dropout_kernels=True)
    assert report.dropout_kernels and len(report.patched) == 7 * TINY_LAYERS

    ref_losses, ref_grads = steps(reference)
    losses, grads = steps(fused)

    assert losses == pytest.approx(ref_losses, rel=1e-5)
    for name, grad in grads.items():
        torch.testing.assert_close(grad, ref_grads[name], rtol=1e-4, atol=1e-6, msg=name)
    # and the masks matter: PyTorch's dropout (other masks) gives another loss
    other = tiny_4bit_model(dropout=p, gc=gc)
    lora_4bit.patch_model(other)
    assert abs(steps(other, 1)[0][0] - losses[0]) > 1e-4


def test_without_the_interpreter_or_a_gpu_the_kernels_are_not_used(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    model = tiny_4bit_model(dropout=0.1)
    report = lora_4bit.patch_model(model, dropout_kernels=True)
    assert not report.dropout_kernels
    assert report.dropout_kernels_note.startswith("no GPU")
    x = torch.randn(3, 8)
    assert lora_4bit.dropout_kernels_for(x, torch.float32, torch.float32) is None


def test_with_activation_offload_the_recompute_draws_the_same_masks(kernels: ModuleType) -> None:
    """Checkpointed layer inputs in host memory (as the planner may choose): the recomputed
    layers draw the seeds, so the masks, of the first forward pass."""
    from finetune_trainer.offload import ActivationOffloader, install

    p = 0.3
    reference = with_kernel_masks(tiny_4bit_model(dropout=p, gc=True), kernels, p)
    fused = tiny_4bit_model(dropout=p, gc=True)
    assert lora_4bit.patch_model(fused, dropout_kernels=True).dropout_kernels
    install(fused, ActivationOffloader(min_bytes=0))
    ref_losses, ref_grads = steps(reference, 2)
    losses, grads = steps(fused, 2)
    assert losses == pytest.approx(ref_losses, rel=1e-5)
    for name, grad in grads.items():
        torch.testing.assert_close(grad, ref_grads[name], rtol=1e-4, atol=1e-6, msg=name)


def test_the_fast_path_reports_the_kernels(kernels: ModuleType) -> None:
    from finetune_trainer import fastpath

    def report(**kwargs: Any) -> Any:
        return fastpath.apply(
            tiny_4bit_model(dropout=0.1), method="qlora", lora_rank=4, max_seq_length=64,
            fused_lora_4bit=True, **kwargs,
        ).lora_4bit  # fmt: skip

    assert report(dropout_kernels=True)["dropout_kernels"] is True
    assert report(dropout_kernels=False)["dropout_kernels"] is False
    assert report()["dropout_kernels"] is fastpath.DROPOUT_KERNELS


def test_the_kernels_are_checked_before_the_layers_use_them(
    kernels: ModuleType, monkeypatch: pytest.MonkeyPatch
) -> None:
    ok, note = kernels.self_check("cpu")
    assert ok, note
    assert "match their masks on cpu" in note

    # A kernel that computes wrongly here (as a faulty compiler or GPU would) is caught, and
    # the layers keep PyTorch's dropout.
    monkeypatch.setattr(lora_4bit, "_CHECKED", {})
    right = kernels.grad_weight
    monkeypatch.setattr(kernels, "grad_weight", lambda *a, **k: right(*a, **k) * 1.5)
    ok, note = kernels.self_check("cpu")
    assert not ok and "weight gradient kernel is off" in note
    model = tiny_4bit_model(dropout=0.1)
    report = lora_4bit.patch_model(model, dropout_kernels=True)
    assert not report.dropout_kernels and report.patched
    assert report.as_dict()["dropout_kernels_note"] == note
    assert not any(m._kernel_dropout for m in model.modules() if hasattr(m, "_fused_adapters"))


def test_the_gpu_benchmarks_layer_check_runs_here(kernels: ModuleType) -> None:
    """bench/bench_dropout_kernels.py's check of a real 4-bit layer, as a GPU call runs it
    (there in bf16), here in float32: the layer equals its written-out form and checkpointing
    changes nothing."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "bench"))
    import bench_dropout_kernels

    result = bench_dropout_kernels.layer_check(rows=48, width=64, rank=8, p=0.25, device="cpu")
    assert result["patched"] == 1 and result["dropoutKernels"] is True
    assert max(result["againstWrittenOut"].values()) < 1e-5
    assert max(result["checkpointedAgainstPlain"].values()) == 0.0


def test_the_gpu_benchmarks_timings_and_tile_sweep_run_here(kernels: ModuleType) -> None:
    """Every timed function and every tile of the sweep runs (tiny sizes, on the CPU): a GPU
    call would otherwise find a broken one only after minutes of set-up."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "bench"))
    import bench_dropout_kernels

    times = bench_dropout_kernels.timings(40, 64, 8, 0.1, repeats=1, device="cpu")
    for impl in ("torch", "kernels", "none"):
        assert times[f"{impl}TotalMs"] > 0
    swept = bench_dropout_kernels.sweep(40, 256, 8, 0.1, repeats=1, device="cpu")
    assert swept.keys() == bench_dropout_kernels.SWEEP.keys()
    for kernel, tiles in swept.items():
        assert len(tiles) == len(bench_dropout_kernels.SWEEP[kernel])
        assert all(ms > 0 for ms in tiles.values()), (kernel, tiles)  # NaN: a tile failed

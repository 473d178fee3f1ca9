# Triton kernels take untyped tensor handles; their launchers below are typed.
# mypy: disable-error-code="no-untyped-def, untyped-decorator"
"""Triton kernels that draw LoRA dropout inside the adapter's ``lora_A`` matrix multiplies.

``dropout(x) @ A.T`` written as PyTorch operators makes two passes over ``x`` besides the
multiply: the dropout kernel reads ``x`` and writes the dropped copy and its mask, and the
backward pass draws that mask again and applies it to the input gradient in two more. On an
8B model that is ~15 bytes moved per element of every adapted projection's input, about a
tenth of a training step. Here the mask is drawn where ``x`` (or the gradient) is already in
registers: in the forward multiply, in the weight-gradient multiply, and in the epilogue of
the input-gradient multiply, which also adds the result into the base projection's input
gradient instead of writing a separate tensor.

The mask is a pure function of ``(seed, row, column)``: Philox 4x32 on the counter
``row * (width / 8) + column / 8``, each of its four 32-bit outputs split into two 16-bit
numbers, one per element, and an element is kept when its number is at least
``round(p * 65536)``. So the three kernels (and :func:`keep_mask`, for tests) agree whatever
their tile sizes, and the dropout probability is ``p`` to within 2**-16; the kept elements are
scaled by the exact inverse of their probability. The masks are not PyTorch's (another
generator), the distribution is the same Bernoulli one.

Import only where Triton can run (CUDA, or ``TRITON_INTERPRET=1`` on CPU for tests): the
kernels are compiled when this module is imported.
"""

from __future__ import annotations

from typing import Any

import torch
import triton
import triton.language as tl
from torch import Tensor

# Philox rounds; 7 already pass the BigCrush statistical tests (Salmon et al., 2011).
N_ROUNDS = 7
THRESHOLD_BITS = 16


def threshold(p: float) -> int:
    """The 16-bit number below which an element is dropped."""
    if not 0.0 < p < 1.0:
        raise ValueError(f"dropout probability must be in (0, 1), got {p}")
    return round(p * (1 << THRESHOLD_BITS))


def keep_scale(p: float) -> float:
    """1 / the probability that an element is kept, for the quantised threshold."""
    return float(1 << THRESHOLD_BITS) / ((1 << THRESHOLD_BITS) - threshold(p))


@triton.jit
def _keep(seed, rows, col0, groups, thr, BLOCK_K: tl.constexpr, N_ROUNDS: tl.constexpr):
    """Keep mask of the tile ``rows`` x ``[col0, col0 + BLOCK_K)``; ``col0 % 8 == 0``."""
    group = col0 // 8 + tl.arange(0, BLOCK_K // 8)
    counter = rows.to(tl.int64)[:, None] * groups + group[None, :]
    r0, r1, r2, r3 = tl.randint4x(seed, counter, N_ROUNDS)
    low = 0xFFFF
    a = tl.join(r0 & low, r0 >> 16)
    b = tl.join(r1 & low, r1 >> 16)
    c = tl.join(r2 & low, r2 >> 16)
    d = tl.join(r3 & low, r3 >> 16)
    numbers = tl.join(tl.join(a, b), tl.join(c, d))
    numbers = tl.reshape(numbers, (rows.shape[0], BLOCK_K))
    return numbers >= thr


@triton.jit(do_not_specialize=["rows", "seed", "thr"])
def _mask_kernel(
    out_ptr,
    rows,
    seed,
    thr,
    width: tl.constexpr,
    BLOCK_T: tl.constexpr,
    BLOCK_K: tl.constexpr,
    N_ROUNDS: tl.constexpr,
):
    t = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    k0 = tl.program_id(1) * BLOCK_K
    k = k0 + tl.arange(0, BLOCK_K)
    keep = _keep(seed, t, k0, width // 8, thr, BLOCK_K, N_ROUNDS)
    inside = (t[:, None] < rows) & (k[None, :] < width)
    tl.store(out_ptr + t.to(tl.int64)[:, None] * width + k[None, :], keep.to(tl.int8), mask=inside)


@triton.jit(do_not_specialize=["rows", "seed", "thr"])
def _project_kernel(
    x_ptr,
    a_ptr,
    out_ptr,
    rows,
    rank,
    stride_x,
    stride_a,
    stride_out,
    seed,
    thr,
    scale,
    width: tl.constexpr,
    BLOCK_T: tl.constexpr,
    BLOCK_K: tl.constexpr,
    BLOCK_R: tl.constexpr,
    N_ROUNDS: tl.constexpr,
):
    """out[t, r] = scale * sum_k keep[t, k] * x[t, k] * a[r, k]"""
    t = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    r = tl.arange(0, BLOCK_R)
    row_in = t[:, None] < rows
    x_rows = x_ptr + t.to(tl.int64)[:, None] * stride_x
    acc = tl.zeros((BLOCK_T, BLOCK_R), dtype=tl.float32)
    for k0 in range(0, width, BLOCK_K):
        k = k0 + tl.arange(0, BLOCK_K)
        x = tl.load(x_rows + k[None, :], mask=row_in & (k[None, :] < width), other=0.0)
        keep = _keep(seed, t, k0, width // 8, thr, BLOCK_K, N_ROUNDS)
        x = tl.where(keep, x, tl.zeros_like(x))
        a = tl.load(
            a_ptr + r[None, :] * stride_a + k[:, None],
            mask=(r[None, :] < rank) & (k[:, None] < width),
            other=0.0,
        )
        acc = tl.dot(x, a, acc)
    out = (acc * scale).to(out_ptr.dtype.element_ty)
    tl.store(
        out_ptr + t.to(tl.int64)[:, None] * stride_out + r[None, :],
        out,
        mask=row_in & (r[None, :] < rank),
    )


@triton.jit(do_not_specialize=["rows", "seed", "thr"])
def _grad_weight_kernel(
    g_ptr,
    x_ptr,
    part_ptr,
    rows,
    rank,
    stride_g,
    stride_x,
    seed,
    thr,
    width: tl.constexpr,
    SPLIT_ROWS: tl.constexpr,
    BLOCK_T: tl.constexpr,
    BLOCK_K: tl.constexpr,
    BLOCK_R: tl.constexpr,
    N_ROUNDS: tl.constexpr,
):
    """part[s, r, k] = sum over split s's rows t of g[t, r] * keep[t, k] * x[t, k]"""
    k0 = tl.program_id(0) * BLOCK_K
    split = tl.program_id(1)
    k = k0 + tl.arange(0, BLOCK_K)
    r = tl.arange(0, BLOCK_R)
    acc = tl.zeros((BLOCK_R, BLOCK_K), dtype=tl.float32)
    start = split * SPLIT_ROWS
    for t0 in range(0, SPLIT_ROWS, BLOCK_T):
        t = start + t0 + tl.arange(0, BLOCK_T)
        row_in = t[:, None] < rows
        g = tl.load(
            g_ptr + t.to(tl.int64)[:, None] * stride_g + r[None, :],
            mask=row_in & (r[None, :] < rank),
            other=0.0,
        )
        x = tl.load(
            x_ptr + t.to(tl.int64)[:, None] * stride_x + k[None, :],
            mask=row_in & (k[None, :] < width),
            other=0.0,
        )
        keep = _keep(seed, t, k0, width // 8, thr, BLOCK_K, N_ROUNDS)
        x = tl.where(keep, x, tl.zeros_like(x))
        acc = tl.dot(tl.trans(g), x, acc)
    tl.store(
        part_ptr + split.to(tl.int64) * rank * width + r[:, None] * width + k[None, :],
        acc,
        mask=(r[:, None] < rank) & (k[None, :] < width),
    )


@triton.jit(do_not_specialize=["rows", "seed", "thr"])
def _grad_input_kernel(
    g_ptr,
    a_ptr,
    gx_ptr,
    rows,
    rank,
    stride_g,
    stride_a,
    stride_gx,
    seed,
    thr,
    scale,
    width: tl.constexpr,
    ACCUMULATE: tl.constexpr,
    BLOCK_T: tl.constexpr,
    BLOCK_K: tl.constexpr,
    BLOCK_R: tl.constexpr,
    N_ROUNDS: tl.constexpr,
):
    """gx[t, k] (+)= scale * keep[t, k] * sum_r g[t, r] * a[r, k]"""
    t = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    k0 = tl.program_id(1) * BLOCK_K
    k = k0 + tl.arange(0, BLOCK_K)
    r = tl.arange(0, BLOCK_R)
    row_in = t[:, None] < rows
    g = tl.load(
        g_ptr + t.to(tl.int64)[:, None] * stride_g + r[None, :],
        mask=row_in & (r[None, :] < rank),
        other=0.0,
    )
    a = tl.load(
        a_ptr + r[:, None] * stride_a + k[None, :],
        mask=(r[:, None] < rank) & (k[None, :] < width),
        other=0.0,
    )
    acc = tl.dot(g, a) * scale
    keep = _keep(seed, t, k0, width // 8, thr, BLOCK_K, N_ROUNDS)
    acc = tl.where(keep, acc, tl.zeros_like(acc))
    inside = row_in & (k[None, :] < width)
    where = gx_ptr + t.to(tl.int64)[:, None] * stride_gx + k[None, :]
    if ACCUMULATE:
        acc += tl.load(where, mask=inside, other=0.0).to(tl.float32)
    tl.store(where, acc.to(gx_ptr.dtype.element_ty), mask=inside)


# --------------------------------------------------------------------------------------------
# Launchers
# --------------------------------------------------------------------------------------------

# Tile sizes; bench/bench_dropout_kernels.py measures them against cuBLAS on the GPU.
PROJECT_TILE = {"BLOCK_T": 64, "BLOCK_K": 64, "num_warps": 4, "num_stages": 3}
GRAD_WEIGHT_TILE = {"BLOCK_T": 64, "BLOCK_K": 64, "num_warps": 4, "num_stages": 3}
GRAD_INPUT_TILE = {"BLOCK_T": 64, "BLOCK_K": 128, "num_warps": 4, "num_stages": 2}


def _rank_block(rank: int) -> int:
    return max(16, int(triton.next_power_of_2(rank)))


def _check(x: Tensor, weight: Tensor) -> tuple[int, int, int]:
    if x.dim() != 2 or weight.dim() != 2 or x.shape[1] != weight.shape[1]:
        raise ValueError(
            f"expected x [rows, width] and weight [rank, width], got "
            f"{tuple(x.shape)} and {tuple(weight.shape)}"
        )
    rows, width = x.shape
    if width % 8:
        raise ValueError(f"the input width must be a multiple of 8, got {width}")
    if x.stride(1) != 1 or weight.stride(1) != 1:
        raise ValueError("the rows of x and weight must be contiguous")
    return rows, width, weight.shape[0]


def keep_mask(rows: int, width: int, p: float, seed: int, device: torch.device | str) -> Tensor:
    """The mask the kernels apply for ``seed``, as a [rows, width] bool tensor (for tests)."""
    out = torch.empty((rows, width), dtype=torch.int8, device=device)
    grid = (triton.cdiv(rows, 32), triton.cdiv(width, 64))
    _mask_kernel[grid](
        out, rows, seed, threshold(p), width=width, BLOCK_T=32, BLOCK_K=64, N_ROUNDS=N_ROUNDS
    )
    return out.bool()


def reference_dropout(x: Tensor, p: float, seed: int) -> Tensor:
    """``x`` with the mask the kernels draw for ``seed`` applied, as plain tensors: what they
    compute, spelled out for tests (the last dimension is the width)."""
    width = x.shape[-1]
    mask = keep_mask(x.numel() // width, width, p, seed, x.device).view(x.shape)
    return x * mask * keep_scale(p)


def project(
    x: Tensor, weight: Tensor, p: float, seed: int, tile: dict[str, int] | None = None
) -> Tensor:
    """``dropout(x) @ weight.T`` for 2-D ``x`` [rows, width] and ``weight`` [rank, width]."""
    rows, width, rank = _check(x, weight)
    out = torch.empty((rows, rank), dtype=x.dtype, device=x.device)
    cfg: dict[str, Any] = dict(tile or PROJECT_TILE)
    grid = (triton.cdiv(rows, cfg["BLOCK_T"]),)
    _project_kernel[grid](
        x,
        weight,
        out,
        rows,
        rank,
        x.stride(0),
        weight.stride(0),
        out.stride(0),
        seed,
        threshold(p),
        keep_scale(p),
        width=width,
        BLOCK_R=_rank_block(rank),
        N_ROUNDS=N_ROUNDS,
        **cfg,
    )
    return out


def grad_weight(
    grad: Tensor, x: Tensor, p: float, seed: int, tile: dict[str, int] | None = None
) -> Tensor:
    """``grad.T @ dropout(x)`` in float32 ([rank, width]) for ``grad`` [rows, rank]."""
    rows, width = x.shape
    rank = grad.shape[1]
    if grad.shape[0] != rows or grad.stride(1) != 1 or x.stride(1) != 1 or width % 8:
        raise ValueError("grad [rows, rank] and x [rows, width] with contiguous rows expected")
    cfg: dict[str, Any] = dict(tile or GRAD_WEIGHT_TILE)
    column_blocks = triton.cdiv(width, cfg["BLOCK_K"])
    # Split the rows so that the grid fills the device about four times over; the split is a
    # power of two of row blocks so that few sizes are compiled.
    if x.is_cuda:
        processors = torch.cuda.get_device_properties(x.device).multi_processor_count
    else:
        processors = 4
    row_blocks = max(1, triton.cdiv(rows, cfg["BLOCK_T"]))
    wanted = max(1, triton.cdiv(4 * processors, column_blocks))
    blocks_per_split = triton.next_power_of_2(triton.cdiv(row_blocks, wanted))
    split_rows = blocks_per_split * cfg["BLOCK_T"]
    splits = max(1, triton.cdiv(rows, split_rows))
    part = torch.zeros((splits, rank, width), dtype=torch.float32, device=x.device)
    if rows:
        _grad_weight_kernel[(column_blocks, splits)](
            grad,
            x,
            part,
            rows,
            rank,
            grad.stride(0),
            x.stride(0),
            seed,
            threshold(p),
            width=width,
            SPLIT_ROWS=split_rows,
            BLOCK_R=_rank_block(rank),
            N_ROUNDS=N_ROUNDS,
            **cfg,
        )
    total = part[0] if splits == 1 else part.sum(0)
    return total.mul_(keep_scale(p))


def grad_input(
    grad: Tensor,
    weight: Tensor,
    p: float,
    seed: int,
    out: Tensor | None = None,
    tile: dict[str, int] | None = None,
) -> Tensor:
    """``dropout'(grad @ weight)``, added into ``out`` [rows, width] when given."""
    rows = grad.shape[0]
    rank, width = weight.shape
    if grad.shape[1] != rank or grad.stride(1) != 1 or weight.stride(1) != 1 or width % 8:
        raise ValueError("grad [rows, rank] and weight [rank, width] with contiguous rows expected")
    accumulate = out is not None
    if out is None:
        out = torch.empty((rows, width), dtype=grad.dtype, device=grad.device)
    elif out.shape != (rows, width) or out.stride(1) != 1:
        raise ValueError(f"out must be [{rows}, {width}] with contiguous rows")
    cfg: dict[str, Any] = dict(tile or GRAD_INPUT_TILE)
    grid = (triton.cdiv(rows, cfg["BLOCK_T"]), triton.cdiv(width, cfg["BLOCK_K"]))
    _grad_input_kernel[grid](
        grad,
        weight,
        out,
        rows,
        rank,
        grad.stride(0),
        weight.stride(0),
        out.stride(0),
        seed,
        threshold(p),
        keep_scale(p),
        width=width,
        ACCUMULATE=accumulate,
        BLOCK_R=_rank_block(rank),
        N_ROUNDS=N_ROUNDS,
        **cfg,
    )
    return out


def self_check(device: torch.device | str) -> tuple[bool, str]:
    """Run the three kernels once on ``device`` against the same products written out with
    :func:`keep_mask`: a start-up guard against a compiler or GPU that computes them wrongly.
    Returns whether they agree, and how closely (or what went wrong)."""
    device = torch.device(device)
    dtype, tolerance = (torch.bfloat16, 2e-2) if device.type == "cuda" else (torch.float32, 1e-4)
    rows, width, rank, p, seed = 100, 136, 8, 0.25, 20261207
    gen = torch.Generator().manual_seed(seed)
    x, a, g, base = (
        torch.randn(shape, generator=gen).to(device=device, dtype=dtype)
        for shape in ((rows, width), (rank, width), (rows, rank), (rows, width))
    )
    try:
        mask = keep_mask(rows, width, p, seed, device)
        kept = float(mask.float().mean())
        if abs(kept - (1 - p)) > 0.03:
            return False, f"the mask keeps {kept:.3f} of the elements, not {1 - p:.3f}"
        dropped = reference_dropout(x.float(), p, seed)
        into = base.clone()
        grad_input(g, a, p, seed, out=into)
        pairs = {
            "forward": (project(x, a, p, seed), dropped @ a.float().t()),
            "weight gradient": (grad_weight(g, x, p, seed), g.float().t() @ dropped),
            "input gradient": (
                into,
                base.float() + reference_dropout(g.float() @ a.float(), p, seed),
            ),
        }
    except Exception as error:  # a kernel that does not compile or launch here
        return False, f"the kernels failed on {device}: {type(error).__name__}: {error}"[:300]
    worst = 0.0
    for name, (got, want) in pairs.items():
        off = float((got.float() - want).abs().max() / want.abs().max())
        if not off <= tolerance:  # also when NaN
            return False, f"the {name} kernel is off by {off:.2g} (relative) on {device}"
        worst = max(worst, off)
    return True, f"the kernels match their masks on {device} (largest relative error {worst:.1g})"

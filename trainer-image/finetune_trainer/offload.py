"""Activation offload: the layer inputs gradient checkpointing keeps go to host memory.

With checkpointing every decoder layer keeps only its input (tokens x hidden, 16-bit) for
the recompute in the backward pass; on an 8B model that is 2 GiB per 8,192 tokens, the
largest part of a checkpointed run's activations. Here those inputs are copied into pinned
host buffers during the forward pass and copied back just before each layer's recompute:

- scope: a ``saved_tensors_hooks`` context around each call of the checkpoint function
  transformers gives its checkpointed layers. Inside the checkpoint torch saves the layer's
  own tensors through its own hooks, so ours see only what the checkpoint keeps for the
  recompute: the layer's tensor inputs (the hidden states);
- overlap: both copies run on a side CUDA stream. The forward copy waits only for the kernel
  that produced the input; the backward copy of layer ``k - 1`` starts when layer ``k``'s
  input is taken back, so it runs during layer ``k``'s recompute and backward;
- buffers: one pinned buffer per layer in flight, kept for the whole run and reused step
  after step (a buffer returns to the pool when autograd drops the saved input); pinning is
  slow and is paid once, not per step.

On a machine without CUDA the hooks still run and copy into plain CPU buffers, so the
tests check the same code path (same loss and gradients, buffer reuse, nothing kept across
steps). Pure helpers at the end read the container's memory limit for the host-memory rule
(``finetune_operator.domain.packed_memory.OFFLOAD_HOST_SHARE``).
"""

from __future__ import annotations

import functools
import logging
import os
import weakref
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch
    from torch import Tensor

log = logging.getLogger(__name__)

# Saved inputs smaller than this stay where they are: copying them gains nothing.
MIN_OFFLOAD_BYTES = 1024 * 1024
_WRAPPED_BY = "__finetune_offloader__"
_PATCHED = "_finetune_activation_offloader"


@dataclass
class OffloadStats:
    """What the offloader did so far (for reports and tests)."""

    buffers: int  # host buffers allocated and kept
    host_bytes: int  # their total size
    allocations: int  # host buffer (re)allocations so far: flat once the run is warm
    in_use: int  # buffers holding a saved input right now (0 between steps)
    offloaded: int  # inputs copied out
    restored: int  # inputs copied back
    prefetched: int  # of those, copied back ahead of their recompute
    pinned: bool

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


class _Buffer:
    """One reusable host buffer (bytes); views of it hold one saved input at a time."""

    __slots__ = ("capacity", "data")

    def __init__(self, data: Tensor) -> None:
        self.data = data
        self.capacity = int(data.numel())


class _Saved:
    """A saved input living in a host buffer, with its optional copy on its way back."""

    __slots__ = (
        "__weakref__",
        "buffer",
        "device",
        "dtype",
        "owner",
        "previous",
        "restoring",
        "shape",
    )

    def __init__(
        self, owner: ActivationOffloader, buffer: _Buffer, x: Tensor, previous: _Saved | None
    ) -> None:
        self.owner = owner
        self.buffer: _Buffer | None = buffer
        self.shape = x.shape
        self.dtype = x.dtype
        self.device = x.device
        # The input saved just before this one: its layer runs backward right after ours.
        self.previous = weakref.ref(previous) if previous is not None else None
        self.restoring: tuple[Tensor, Any] | None = None

    def host_view(self) -> Tensor:
        assert self.buffer is not None
        nbytes = _nbytes(self.shape, self.dtype)
        return self.buffer.data[:nbytes].view(self.dtype).view(self.shape)

    def __del__(self) -> None:
        # Autograd dropped the saved input (after its backward, or a forward never run
        # backward): the buffer goes back to the pool. Any copy still reading it is queued
        # on the side stream ahead of the next copy into it.
        buffer, self.buffer = self.buffer, None
        if buffer is not None:
            self.owner._release(buffer)


def _nbytes(shape: torch.Size, dtype: torch.dtype) -> int:
    count = 1
    for n in shape:
        count *= int(n)
    return count * dtype.itemsize


class ActivationOffloader:
    """Pack/unpack hooks that keep checkpointed layer inputs in reusable host buffers."""

    def __init__(self, device_type: str | None = None, min_bytes: int = MIN_OFFLOAD_BYTES) -> None:
        import torch

        if device_type is None:
            device_type = "cuda" if torch.cuda.is_available() else "cpu"
        self.device_type = device_type
        self.min_bytes = min_bytes
        self.pinned = device_type == "cuda"
        # Made on first use, on the device of the first input (one GPU per process).
        self._stream: Any = None
        self._free: list[_Buffer] = []
        self._buffers: list[_Buffer] = []
        self._last: weakref.ReferenceType[_Saved] | None = None
        self._allocations = 0
        self._offloaded = 0
        self._restored = 0
        self._prefetched = 0

    # ------------------------------------------------------------------ buffers

    def reserve(self, count: int, nbytes: int) -> None:
        """Allocate ``count`` buffers of ``nbytes`` up front (one per layer of a planned
        micro-batch), so the first steps pin nothing either."""
        while len(self._buffers) < count:
            self._new_buffer(nbytes)
        for buffer in list(self._free):
            if buffer.capacity < nbytes:
                self._grow(buffer, nbytes)

    def _alloc(self, nbytes: int) -> Tensor:
        import torch

        self._allocations += 1
        return torch.empty(nbytes, dtype=torch.uint8, pin_memory=self.pinned)

    def _new_buffer(self, nbytes: int) -> _Buffer:
        buffer = _Buffer(self._alloc(nbytes))
        self._buffers.append(buffer)
        self._free.append(buffer)
        return buffer

    def _grow(self, buffer: _Buffer, nbytes: int) -> None:
        buffer.data = self._alloc(nbytes)
        buffer.capacity = nbytes

    def _acquire(self, nbytes: int) -> _Buffer:
        fitting = [b for b in self._free if b.capacity >= nbytes]
        if fitting:
            buffer = min(fitting, key=lambda b: b.capacity)
        elif self._free:
            # Packed micro-batches vary in size: grow to the largest size seen so far, so
            # every buffer soon fits every micro-batch and nothing is allocated again.
            buffer = max(self._free, key=lambda b: b.capacity)
            largest = max(b.capacity for b in self._buffers)
            self._grow(buffer, max(nbytes, largest))
        else:
            largest = max((b.capacity for b in self._buffers), default=0)
            buffer = self._new_buffer(max(nbytes, largest))
        self._free.remove(buffer)
        return buffer

    def _release(self, buffer: _Buffer) -> None:
        self._free.append(buffer)

    # ------------------------------------------------------------------ hooks

    def _eligible(self, x: Tensor) -> bool:
        return (
            x.device.type == self.device_type
            and x.is_floating_point()
            and x.numel() * x.element_size() >= self.min_bytes
        )

    def _pack(self, x: Tensor) -> Any:
        import torch

        if not self._eligible(x):
            return x
        previous = self._last() if self._last is not None else None
        saved = _Saved(self, self._acquire(x.numel() * x.element_size()), x, previous)
        host = saved.host_view()
        if self.pinned and self._stream is None:
            self._stream = torch.cuda.Stream(device=x.device)
        with torch.no_grad():
            if self._stream is not None:
                # Wait only for the kernel that produced x; the copy then overlaps compute.
                self._stream.wait_stream(torch.cuda.current_stream(x.device))
                with torch.cuda.stream(self._stream):
                    host.copy_(x, non_blocking=True)
                # x may be freed on the compute stream before the copy has read it.
                x.record_stream(self._stream)
            else:
                host.copy_(x)
        self._offloaded += 1
        self._last = weakref.ref(saved)
        return saved

    def _start_restore(self, saved: _Saved) -> None:
        import torch

        if saved.restoring is not None or saved.buffer is None:
            return
        host = saved.host_view()
        with torch.no_grad():
            # Allocated on the compute stream, which uses it; the side stream writes it.
            out = torch.empty(saved.shape, dtype=saved.dtype, device=saved.device)
            if self._stream is not None:
                # The block may have been freed by kernels still queued on the compute
                # stream: write it only after them (the copy then overlaps what comes next).
                self._stream.wait_stream(torch.cuda.current_stream(saved.device))
                with torch.cuda.stream(self._stream):
                    out.copy_(host, non_blocking=True)
                    done = torch.cuda.Event()
                    done.record(self._stream)
                out.record_stream(self._stream)
            else:
                out.copy_(host)
                done = None
        saved.restoring = (out, done)

    def _unpack(self, packed: Any) -> Tensor:
        import torch

        if not isinstance(packed, _Saved):
            return packed  # type: ignore[no-any-return]
        prefetched = packed.restoring is not None
        self._start_restore(packed)
        assert packed.restoring is not None, "a saved input was taken back after it was freed"
        out, done = packed.restoring
        packed.restoring = None
        if done is not None:
            torch.cuda.current_stream(out.device).wait_event(done)
        self._restored += 1
        self._prefetched += int(prefetched)
        # The layer before this one runs backward next: bring its input back meanwhile.
        previous = packed.previous() if packed.previous is not None else None
        if previous is not None:
            self._start_restore(previous)
        return out

    def hooks(self) -> Any:
        """The saved-tensor hooks; wrap exactly the checkpoint call in them."""
        import torch

        return torch.autograd.graph.saved_tensors_hooks(self._pack, self._unpack)

    def wrap(self, checkpoint_fn: Callable[..., Any]) -> Callable[..., Any]:
        """The checkpoint function with its saved inputs offloaded (idempotent)."""
        inner = getattr(checkpoint_fn, "__wrapped__", checkpoint_fn)
        if getattr(checkpoint_fn, _WRAPPED_BY, None) is self:
            return checkpoint_fn

        @functools.wraps(inner)
        def offloaded_checkpoint(function: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
            with self.hooks():
                return inner(function, *args, **kwargs)

        setattr(offloaded_checkpoint, _WRAPPED_BY, self)
        return offloaded_checkpoint

    def stats(self) -> OffloadStats:
        return OffloadStats(
            buffers=len(self._buffers),
            host_bytes=sum(b.capacity for b in self._buffers),
            allocations=self._allocations,
            in_use=len(self._buffers) - len(self._free),
            offloaded=self._offloaded,
            restored=self._restored,
            prefetched=self._prefetched,
            pinned=self.pinned,
        )


# --------------------------------------------------------------------------------------------
# Installing it on a transformers model
# --------------------------------------------------------------------------------------------


def _unwrap(fn: Callable[..., Any]) -> Callable[..., Any]:
    if getattr(fn, _WRAPPED_BY, None) is not None:
        return fn.__wrapped__  # type: ignore[attr-defined,no-any-return]
    return fn


def _patch_enable(model: Any, offloader: ActivationOffloader) -> None:
    """Make ``model._set_gradient_checkpointing`` wrap the function it installs.

    The Trainer (and PEFT's k-bit preparation) enable checkpointing again when training
    starts, which replaces every layer's checkpoint function; this keeps ours in place.
    """
    from torch.utils.checkpoint import checkpoint

    original = vars(model).get(_PATCHED + "_original") or model._set_gradient_checkpointing

    @functools.wraps(original)
    def set_gradient_checkpointing(
        enable: bool = True,
        gradient_checkpointing_func: Callable[..., Any] = checkpoint,
        **kwargs: Any,
    ) -> Any:
        if enable:
            gradient_checkpointing_func = offloader.wrap(gradient_checkpointing_func)
        return original(
            enable=enable, gradient_checkpointing_func=gradient_checkpointing_func, **kwargs
        )

    model._set_gradient_checkpointing = set_gradient_checkpointing
    setattr(model, _PATCHED + "_original", original)
    setattr(model, _PATCHED, offloader)


def install(model: Any, offloader: ActivationOffloader) -> int:
    """Offload the saved inputs of every checkpointed layer of ``model`` (a transformers or
    PEFT model), now and whenever checkpointing is enabled again. Returns how many layers
    are checkpointed right now (0 when checkpointing is enabled later, by the Trainer)."""
    from transformers import PreTrainedModel

    layers = 0
    for module in model.modules():
        if isinstance(module, PreTrainedModel):
            _patch_enable(module, offloader)
        # vars(): PEFT wrappers forward unknown attributes to the model they wrap.
        fn = vars(module).get("_gradient_checkpointing_func")
        if fn is not None:
            module._gradient_checkpointing_func = offloader.wrap(_unwrap(fn))
            layers += int(bool(getattr(module, "gradient_checkpointing", False)))
    return layers


def installed(model: Any) -> ActivationOffloader | None:
    """The offloader installed on ``model``, if any."""
    for module in model.modules():
        offloader = vars(module).get(_PATCHED)
        if isinstance(offloader, ActivationOffloader):
            return offloader
    return None


def uninstall(model: Any) -> None:
    """Undo :func:`install` (the benchmark trains several variants on one base model)."""
    for module in model.modules():
        if vars(module).get(_PATCHED) is not None:
            del module._set_gradient_checkpointing
            delattr(module, _PATCHED + "_original")
            delattr(module, _PATCHED)
        fn = vars(module).get("_gradient_checkpointing_func")
        if fn is not None:
            module._gradient_checkpointing_func = _unwrap(fn)


# --------------------------------------------------------------------------------------------
# Host memory (pure): how much pinned memory the container may take
# --------------------------------------------------------------------------------------------

CGROUP_FILES = (
    Path("/sys/fs/cgroup/memory.max"),  # cgroup v2
    Path("/sys/fs/cgroup/memory/memory.limit_in_bytes"),  # cgroup v1
)
# cgroup v1 reports "no limit" as a huge page-aligned number.
_NO_LIMIT = 1 << 60


def container_memory_limit(files: tuple[Path, ...] = CGROUP_FILES) -> int | None:
    """The container's memory limit in bytes from its cgroup; None without a limit."""
    for path in files:
        try:
            text = path.read_text().strip()
        except OSError:
            continue
        if text == "max":
            return None
        try:
            value = int(text)
        except ValueError:
            continue
        return value if 0 < value < _NO_LIMIT else None
    return None


def host_memory_bytes(
    files: tuple[Path, ...] = CGROUP_FILES, meminfo: Path = Path("/proc/meminfo")
) -> int | None:
    """Memory this process may fill: the container's limit, else the host's total memory
    (``FINETUNE_HOST_MEMORY_BYTES`` wins when set: the pod's memory request, given by the
    operator, when there is no limit)."""
    given = os.environ.get("FINETUNE_HOST_MEMORY_BYTES", "").strip()
    limit = container_memory_limit(files)
    if given.isdigit() and int(given) > 0:
        return min(int(given), limit) if limit else int(given)
    if limit is not None:
        return limit
    try:
        for line in meminfo.read_text().splitlines():
            if line.startswith("MemTotal:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None

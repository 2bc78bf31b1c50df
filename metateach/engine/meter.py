"""Time and memory of a teacher update, measured in the tensors autograd saves for it."""

from __future__ import annotations

import time

import torch
from torch import Tensor

__all__ = ["UpdateMeter"]


class UpdateMeter:
    """Time and memory of a teacher update, which may span several student steps.

    Memory is counted in the tensors autograd saves for backward between
    :meth:`start` and :meth:`stop` (distinct storages), the same way on any
    device: ``teacher/graph_mb`` is all of them, ``teacher/graph_peak_mb``
    the most held at one moment (a graph's tensors stop counting when the
    graph is freed). On CUDA, ``teacher/peak_cuda_mb`` is the allocator's
    peak as well.

    Autograd checks, when it unpacks a saved tensor, that nothing modified
    it in place since it was saved, but it skips that check for tensors
    that pass through saved-tensor hooks. The meter's hooks therefore keep
    the tensor's version and make the same check themselves: a meter must
    not let a corrupted graph give a silently wrong hypergradient.
    """

    def __init__(self, student: torch.nn.Module) -> None:
        self.cuda = next(student.parameters()).is_cuda
        self._saved: dict[tuple[int, str], int] = {}  # storage -> bytes, every one saved
        self._held: dict[tuple[int, str], int] = {}  # storage -> saved tensors alive on it
        self._held_bytes = 0
        self._peak_bytes = 0
        self._hooks = torch.autograd.graph.saved_tensors_hooks(self._pack, _unpack)
        self._start = 0.0
        #: Between :meth:`start` and :meth:`stop`.
        self.running = False

    def _pack(self, t: Tensor) -> _Held | Tensor:
        if t._is_zerotensor():  # forward mode's symbolic zeros own no memory
            return t
        storage = t.untyped_storage()
        key = (storage.data_ptr(), str(t.device))
        self._saved[key] = storage.nbytes()
        if key not in self._held:
            self._held[key] = 0
            self._held_bytes += storage.nbytes()
            self._peak_bytes = max(self._peak_bytes, self._held_bytes)
        self._held[key] += 1
        # Detached: a saved output held with its grad_fn would form a cycle
        # through C++ that no garbage collection frees. Autograd restores
        # the grad_fn on unpacking. The detached tensor shares t's version counter.
        return _Held(t.detach(), t._version, key, self)

    def _release(self, key: tuple[int, str]) -> None:
        self._held[key] -= 1
        if not self._held[key]:
            del self._held[key]
            self._held_bytes -= self._saved.get(key, 0)

    def start(self) -> None:
        self._saved.clear()
        self._held.clear()
        self._held_bytes = self._peak_bytes = 0
        if self.cuda:
            torch.cuda.reset_peak_memory_stats()
        self._start = time.perf_counter()
        self._hooks.__enter__()
        self.running = True

    def stop(self) -> dict[str, float]:
        self._hooks.__exit__(None, None, None)
        self.running = False
        metrics = {
            "teacher/graph_mb": sum(self._saved.values()) / 2**20,
            "teacher/graph_peak_mb": self._peak_bytes / 2**20,
        }
        if self.cuda:
            torch.cuda.synchronize()
            metrics["teacher/peak_cuda_mb"] = torch.cuda.max_memory_allocated() / 2**20
        metrics["teacher/update_seconds"] = time.perf_counter() - self._start
        return metrics


class _Held:
    """A tensor autograd saved under an :class:`UpdateMeter`, with its version when it was saved;
    it stops counting when the graph lets go."""

    __slots__ = ("tensor", "version", "key", "meter")

    def __init__(
        self, tensor: Tensor, version: int, key: tuple[int, str], meter: UpdateMeter
    ) -> None:
        self.tensor, self.version, self.key, self.meter = tensor, version, key, meter

    def __del__(self) -> None:
        self.meter._release(self.key)


def _unpack(packed: _Held | Tensor) -> Tensor:
    """The saved tensor, unless it was modified in place since it was saved (autograd's own check)."""
    if not isinstance(packed, _Held):
        return packed
    if packed.tensor._version != packed.version:
        t = packed.tensor
        raise RuntimeError(
            "one of the variables needed for gradient computation has been modified by an "
            f"inplace operation: [{t.type()} {list(t.shape)}] is at version {t._version}; "
            f"expected version {packed.version} instead (checked by metateach's UpdateMeter, "
            "whose saved-tensor hooks would otherwise skip autograd's own check)"
        )
    return packed.tensor

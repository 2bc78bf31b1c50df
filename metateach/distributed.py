"""Data-parallel training over processes, on PyTorch's own engine (``torchrun``).

Under ``torchrun --nproc_per_node=N tools/train.py CONFIG`` every process
trains the same student on its shard of each batch: ``train.batch_size``
is the *global* batch, split in contiguous shards across the ranks (the
validation batches of the teacher and the evaluation batches likewise).

Rather than wrapping the student in DistributedDataParallel, whose hooks
see only a module's own backward, the gradients are summed where the
teaching engine forms them, which also covers the virtual steps the
hypergradient methods take on parameter dicts. While a sharded batch is
taught (:func:`sharded`), every batch-level quantity spans the whole
global batch:

* :func:`batch_sum` sums a tensor over the shards, differentiably in both
  reverse and forward mode: the lesson's loss divides by the global number
  of samples that count, and a teacher's weights are normalized over the
  global batch, so each rank's loss is its share of the single-process loss;
* :func:`sum_gradients` then sums the shares' gradients (the student's step,
  a virtual step's gradient, the validation gradient, the teacher's
  hypergradient), so every rank takes the single-process step and keeps the
  same student and the same teacher.

The unrolled window sums each differentiated step's gradient inside its
graph (:func:`sum_gradients` with ``differentiable``); the reversible one
splits each step's direction into shares (the weight decay in rank 0's,
:func:`holds_constant_terms`) and sums the adjoints at every step.

What is chosen *within* a batch from its samples alone (self-paced
learning's threshold, BatchNorm's statistics) is chosen per shard, as
BatchNorm without SyncBatchNorm is; so is co-teaching's small-loss set
(its noise-rate estimate merges every process's losses, :func:`merge_shards`).
Strategies that are not yet written
this way say so (``TeachingStrategy.data_parallel``), and the trainer
refuses them under several processes.
Only rank 0 logs, plots and writes checkpoints; every rank evaluates its
shard of the validation and test sets and the sums are combined.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from datetime import timedelta
from typing import TYPE_CHECKING, Any, TypeVar

import torch
import torch.distributed as dist
from torch import Tensor

from metateach.errors import ConfigError, MetateachError

if TYPE_CHECKING:
    from metateach.config import ExperimentConfig

__all__ = [
    "World", "init_world", "from_main", "sharded", "batch_sum", "sum_gradients", "all_sum",
    "holds_constant_terms", "merge_shards",
]  # fmt: skip

T = TypeVar("T")


@dataclass(frozen=True)
class World:
    """This process's place among the data-parallel processes (one process: rank 0 of 1)."""

    rank: int = 0
    size: int = 1

    @property
    def main(self) -> bool:
        """Whether this process logs and writes checkpoints."""
        return self.rank == 0

    @property
    def shard(self) -> tuple[int, int]:
        """(rank, size): which part of each global batch this process takes."""
        return self.rank, self.size


def init_world(device: str) -> tuple[World, str]:
    """The world ``torchrun`` started this process in, its process group joined.

    Returns the world and the device to train on: under several processes
    with ``device`` auto or cuda, the GPU ``LOCAL_RANK``. One process (no
    ``WORLD_SIZE`` above 1) is the world of one, with no process group.
    """
    size = int(os.environ.get("WORLD_SIZE", "1"))
    if size <= 1:
        return World(), device
    rank, local = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    cuda = device in ("auto", "cuda") and torch.cuda.is_available()
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"train.device={device} but CUDA is not available here; use auto or cpu")
    if cuda:
        torch.cuda.set_device(local)
        device = f"cuda:{local}"
    elif device == "auto":
        device = "cpu"
    if not dist.is_initialized():
        dist.init_process_group(
            "nccl" if cuda else "gloo", timeout=timedelta(minutes=30)
        )  # env://: MASTER_ADDR, MASTER_PORT, RANK, WORLD_SIZE from torchrun
    return World(rank, size), device


def from_main(world: World, make: Callable[[], T]) -> T:
    """``make()`` on rank 0, its result handed to every rank (e.g. a new run folder's name).

    A :class:`~metateach.errors.MetateachError` raised on rank 0 is raised on
    every rank, so none waits for a result that never comes.
    """
    if world.size == 1:
        return make()
    box: list[object] = [None, None]
    if world.main:
        try:
            box[0] = make()
        except MetateachError as e:
            box[1] = e
    dist.broadcast_object_list(box, src=0)
    if box[1] is not None:
        raise box[1]  # type: ignore[misc]
    return box[0]  # type: ignore[return-value]


#: The world whose processes share the batch being taught now, or None.
_SHARDED: World | None = None


@contextlib.contextmanager
def sharded(world: World) -> Iterator[None]:
    """Within this block, batch-level sums span the shards of ``world`` (see the module docstring).

    Every rank must run the same code inside it: the sums are collective.
    """
    global _SHARDED
    before, _SHARDED = _SHARDED, world if world.size > 1 else None
    try:
        yield
    finally:
        _SHARDED = before


def holds_constant_terms() -> bool:
    """Whether this process's share of a sum holds the terms that are not the batch's.

    A quantity such as momentum SGD's direction d = grad L + lambda theta,
    split into shares that sum to it, gives lambda theta to one share only:
    rank 0's (every process's own outside :func:`sharded`).
    """
    return _SHARDED is None or _SHARDED.main


def merge_shards(t: Tensor) -> Tensor:
    """Per-sample values that each process filled for its own samples (nan elsewhere), merged.

    Outside :func:`sharded`, ``t`` itself. One collective.
    """
    if _SHARDED is None:
        return t
    seen = torch.isfinite(t)
    total, count = all_sum([torch.where(seen, t, torch.zeros_like(t)), seen.to(t.dtype)])
    assert total is not None and count is not None
    return torch.where(count > 0, total / count.clamp(min=1), torch.full_like(t, float("nan")))


def batch_sum(t: Tensor) -> Tensor:
    """``t`` summed over the shards of the batch being taught (``t`` itself outside :func:`sharded`).

    Differentiable: the gradient (and a forward-mode tangent) is summed too.
    """
    if _SHARDED is None:
        return t
    return _AllSum.apply(t)


def sum_gradients(
    grads: Sequence[Tensor | None], differentiable: bool = False
) -> list[Tensor | None]:
    """The gradients summed over the shards (as they are outside :func:`sharded`); one collective.

    With ``differentiable``, the sum keeps its graph (:func:`batch_sum` of all
    of them at once), for gradients taken with ``create_graph``.
    """
    if _SHARDED is None:
        return list(grads)
    if not differentiable:
        return all_sum(grads)
    return _summed_flat(grads, batch_sum)


def all_sum(tensors: Sequence[Tensor | None]) -> list[Tensor | None]:
    """``tensors`` (detached) summed over all processes in one collective; Nones stay None.

    Every rank must pass the same shapes with None in the same places.
    """
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return list(tensors)

    def reduced(flat: Tensor) -> Tensor:
        flat = flat.detach().to(torch.float64)
        dist.all_reduce(flat)
        return flat

    return _summed_flat(tensors, reduced)


def _summed_flat(
    tensors: Sequence[Tensor | None], total: Callable[[Tensor], Tensor]
) -> list[Tensor | None]:
    """``tensors`` flattened into one, ``total`` of it, and the parts back in their shapes and dtypes."""
    present = [t for t in tensors if t is not None]
    if not present:
        return list(tensors)
    flat = total(torch.cat([t.reshape(-1) for t in present]))
    out: list[Tensor | None] = []
    offset = 0
    for t in tensors:
        if t is None:
            out.append(None)
            continue
        out.append(flat[offset : offset + t.numel()].view(t.shape).to(t.dtype))
        offset += t.numel()
    return out


class _AllSum(torch.autograd.Function):
    """Sum over the processes; its gradient and its tangent are summed the same way.

    Each rank's loss is its share of the total, so the total's gradient with
    respect to this rank's input is the sum over ranks of the incoming gradients.
    """

    @staticmethod
    def forward(t: Tensor) -> Tensor:  # type: ignore[override]
        out = t.detach().clone()
        dist.all_reduce(out)
        return out

    @staticmethod
    def setup_context(ctx, inputs, output) -> None:  # type: ignore[no-untyped-def]
        pass

    @staticmethod
    def backward(ctx, grad: Tensor) -> Tensor:  # type: ignore[override]
        return _AllSum.apply(grad)  # itself differentiable, for second-order graphs

    @staticmethod
    def jvp(ctx, tangent: Tensor) -> Tensor:  # type: ignore[override]
        tangent = tangent.clone()
        dist.all_reduce(tangent)
        return tangent


def gather_objects(world: World, mine: T) -> list[T]:
    """Every rank's ``mine``, in rank order (collective; picklable objects)."""
    gathered: list[Any] = [None] * world.size
    dist.all_gather_object(gathered, mine)
    return gathered


def check_data_parallel(cfg: ExperimentConfig, strategy: Any, world: World) -> None:
    """Refuse, on every rank alike, a run that cannot be split over ``world``'s processes."""
    if not strategy.data_parallel:
        method = cfg.teacher.hypergrad.method if cfg.teacher.name != "none" else "none"
        raise ConfigError(
            f"teacher {cfg.teacher.name!r} ({type(strategy).__name__}, teacher.hypergrad.method="
            f"{method}) does not run data-parallel yet: run it in one process; under torchrun, "
            "every other teacher and method does (REINFORCE's sampled lessons would need the "
            "global batch's draws)"
        )
    for key, size in (
        ("train.batch_size", cfg.train.batch_size),
        ("train.eval_batch_size", cfg.train.eval_batch_size),
        ("teacher.hypergrad.val_batch_size", cfg.teacher.hypergrad.val_batch_size),
    ):
        if isinstance(size, int) and size < world.size:
            raise ConfigError(
                f"{key}={size} is the global batch and cannot be split over {world.size} "
                "processes; make it at least the number of processes"
            )

"""Where a run computes and how it is made repeatable."""

from __future__ import annotations

import contextlib
import ctypes
import os
import random
import signal
import sys
import threading
from collections.abc import Iterator
from typing import Any

import numpy as np
import torch

from metateach.distributed import World, gather_objects
from metateach.errors import ConfigError

__all__ = [
    "keep_freed_memory",
    "resolve_device",
    "seed_everything",
    "rng_state",
    "restore_rng_state",
    "stops_on_signals",
]


def resolve_device(name: str) -> torch.device:
    """``auto`` is CUDA when present, else the CPU; an unavailable device is a ConfigError."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"train.device={name} but CUDA is not available here; use auto or cpu")
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise ConfigError(f"train.device={name} but MPS is not available here; use auto or cpu")
    return device


#: glibc's mallopt parameters (malloc.h) and the values :func:`keep_freed_memory` sets.
_MALLOPT = {
    -1: 1 << 30,  # M_TRIM_THRESHOLD: give memory back only past 1 GiB free at the heap's top
    -2: 64 << 20,  # M_TOP_PAD: grow the heap 64 MiB at a time
    -3: 32 << 20,  # M_MMAP_THRESHOLD: blocks up to 32 MiB (glibc's most) come from the heap
}


def keep_freed_memory() -> bool:
    """Have glibc's malloc keep the memory the process frees, for its next allocations.

    By default glibc serves a block above its mmap threshold (128 KiB at
    first, raised as such blocks are freed) with fresh pages from the system
    and returns them when it is freed; the next step's tensor of the same
    size then faults its pages in again, zeroed by the kernel. A training
    step frees and reallocates its activations every step: on the CPU that
    costs several percent of a step, and makes the same step's time wander
    between runs with where the threshold has drifted to (docs/speed.md). With blocks up to 32 MiB taken from the heap
    and the heap kept, they reuse the last step's pages. This is the
    allocator tuning PyTorch's performance guide obtains with jemalloc or
    TCMalloc, without preloading a library.

    Process-wide and not undone. Returns whether it applied: False where the
    C library has no ``mallopt`` (not Linux, or musl).
    """
    if not sys.platform.startswith("linux"):
        return False
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    return all(mallopt(param, value) == 1 for param, value in _MALLOPT.items())


def seed_everything(
    seed: int, deterministic: bool = True, device: torch.device | None = None
) -> None:
    """Seed Python, NumPy and PyTorch; with ``deterministic``, make CUDA kernels deterministic too.

    PyTorch's CPU kernels already give the same bits for the same inputs and
    thread count, and ``torch.use_deterministic_algorithms`` would make some
    of them (convolutions) several times slower, so it is turned on only
    for CUDA, together with the fixed cuBLAS workspace that needs.
    """
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
    cuda = device is not None and device.type == "cuda"
    if deterministic and cuda:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    torch.use_deterministic_algorithms(deterministic and cuda, warn_only=True)
    torch.backends.cudnn.benchmark = not deterministic


def rng_state(world: World) -> dict:
    """PyTorch's random state for a checkpoint; under torchrun with every rank's own (collective)."""
    state: dict = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    if world.size > 1:  # every rank's own, for an exact resume
        state["ranks"] = gather_objects(world, dict(state))
    return state


def restore_rng_state(saved: dict, world: World) -> None:
    """Set the random state :func:`rng_state` saved, this rank's own where it holds one."""
    ranks = saved.get("ranks")
    if world.size > 1 and ranks is not None and len(ranks) == world.size:
        saved = ranks[world.rank]
    torch.set_rng_state(saved["torch"])
    if "cuda" in saved and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(saved["cuda"])


@contextlib.contextmanager
def stops_on_signals(trainer: Any) -> Iterator[None]:
    """SIGINT (Ctrl-C) and SIGTERM ask ``trainer`` (a :class:`~metateach.trainer.Trainer`) to
    stop at its next step boundary, saved.

    The first signal only sets ``trainer.stop_signal``; the loop saves a
    checkpoint at the first boundary where the teaching strategy allows one
    (the end of a differentiable window) and raises :class:`~metateach.errors.RunInterrupted`.
    Nothing raises inside the engine, so no step is left half done and no
    interrupt lands where Python cannot raise it (a finalizer). A second
    signal acts at once, as it would without this block. Only in the main
    thread of a single process: under torchrun the ranks would stop at
    different steps. A signal the process ignores stays ignored (a
    comparison's workers leave Ctrl-C to their parent, which sends each one
    SIGTERM).
    """
    if threading.current_thread() is not threading.main_thread() or trainer.world.size > 1:
        yield
        return
    previous = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    previous = {s: handler for s, handler in previous.items() if handler is not signal.SIG_IGN}

    def ask(signum: int, frame: Any) -> None:
        trainer.stop_signal = signum
        for s, handler in previous.items():  # a second signal: the usual behaviour
            signal.signal(s, handler)

    for s in previous:
        signal.signal(s, ask)
    try:
        yield
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)

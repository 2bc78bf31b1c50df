"""Co-teaching: two networks, each learning from the samples its peer finds easy.

With SAM as both networks' optimizer (``optim.sam.rho`` > 0) the same
exchange is SRIT, Sharpness Reduction Interactive Teaching: each network's
perturbation and gradient are taken on its peer's selection.

References:
    Han, Yao, Yu, Niu, Xu, Hu, Tsang and Sugiyama, "Co-teaching: Robust
    training of deep neural networks with extremely noisy labels", NeurIPS 2018.
    "Sharpness Reduction Interactive Teaching" (SRIT), Algorithm 1.
    Arazo, Ortego, Albert, O'Connor and McGuinness, "Unsupervised label noise
    modeling and loss correction", ICML 2019 (the two-component mixture on
    the losses that estimates the noise rate).
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import Tensor, nn

from metateach.distributed import merge_shards
from metateach.registry import TEACHERS
from metateach.teacher import PeerTeacher, TeachingContext

__all__ = ["CoTeaching", "keep_ratio", "small_loss_mask", "estimate_noise_rate"]


def keep_ratio(epoch: int, forget_rate: float, gradual_epochs: int) -> float:
    """R(T) = 1 - min(T / T_k * tau, tau): all samples at first, 1 - tau from epoch T_k on.

    ``epoch`` is T, the epochs finished (0 during the first), so the keep
    ratio falls linearly from 1 to 1 - tau over the first T_k epochs.
    """
    if gradual_epochs == 0:
        return 1.0 - forget_rate
    return 1.0 - min(epoch / gradual_epochs * forget_rate, forget_rate)


def small_loss_mask(losses: Tensor, ratio: float) -> Tensor:
    """The floor(ratio * n) samples of smallest loss (at least one), as a boolean mask."""
    n = losses.shape[0]
    keep = min(n, max(1, math.floor(ratio * n + 1e-9)))
    mask = torch.zeros(n, dtype=torch.bool, device=losses.device)
    mask[torch.topk(losses, keep, largest=False).indices] = True
    return mask


def estimate_noise_rate(losses: Tensor, iterations: int = 30) -> float:
    """The share of samples in the high-loss component of a two-Gaussian mixture fitted to ``losses``.

    Mislabeled samples are learned late, so their losses form the upper
    mode; EM fits the mixture on the losses scaled to [0, 1] (Arazo et al.
    2019), and a sample counts as noisy when its posterior for the upper
    component exceeds one half.
    """
    x = losses.double().flatten()
    if x.numel() < 2 or float(x.max() - x.min()) == 0.0:
        return 0.0
    x = (x - x.min()) / (x.max() - x.min())
    mean = torch.quantile(x, torch.tensor([0.25, 0.75], dtype=x.dtype, device=x.device))
    var = x.var().expand(2).clone()
    weight = x.new_full((2,), 0.5)
    for _ in range(iterations):
        log_p = (
            weight.log() - 0.5 * (2 * math.pi * var).log() - (x[:, None] - mean) ** 2 / (2 * var)
        )
        posterior = log_p.softmax(dim=1)
        count = posterior.sum(dim=0).clamp(min=1e-12)
        weight = count / len(x)
        mean = (posterior * x[:, None]).sum(dim=0) / count
        var = (posterior * (x[:, None] - mean) ** 2).sum(dim=0) / count + 5e-4
    upper = int(mean.argmax())
    return float((posterior[:, upper] > 0.5).double().mean())


@TEACHERS.register("co_teaching")
class CoTeaching(PeerTeacher):
    """A peer network of the student's kind; each keeps the R(T)|D| smallest-loss samples for the other.

    Args:
        new_student: builds the peer (the library passes the run's model).
        noise_rate: the configured noise rate (``noise.rate``), the default forget rate.
        train_size: the training split's size (for ``forget_rate: auto``).
        forget_rate: tau, the share of each batch left out once the ramp is
            over: a number in [0, 1); unset means ``noise.rate``, as in
            co-teaching; ``auto`` estimates it each epoch from the losses of
            the epoch before (:func:`estimate_noise_rate`), needing no noise rate.
        gradual_epochs: T_k, the epochs over which the keep ratio falls from 1 to 1 - tau.
    """

    def __init__(
        self,
        new_student: Callable[[], nn.Module],
        noise_rate: float,
        train_size: int,
        forget_rate: float | str | None = None,
        gradual_epochs: int = 10,
    ) -> None:
        super().__init__()
        if forget_rate is None:
            forget_rate = noise_rate
        self.auto = forget_rate == "auto"
        if not self.auto and not (
            isinstance(forget_rate, int | float) and 0 <= float(forget_rate) < 1
        ):
            raise ValueError(f"forget_rate must be in [0, 1) or 'auto', got {forget_rate!r}")
        if not isinstance(gradual_epochs, int) or gradual_epochs < 0:
            raise ValueError(f"gradual_epochs must be an integer >= 0, got {gradual_epochs!r}")
        self.gradual_epochs = gradual_epochs
        self.peer = new_student()
        # tau: fixed, or the latest estimate; with ``auto``, this epoch's losses so far.
        self.register_buffer("forget_rate", torch.tensor(0.0 if self.auto else float(forget_rate)))
        self.register_buffer(
            "epoch_losses", torch.full((train_size if self.auto else 0,), math.nan)
        )
        self.register_buffer("loss_epoch", torch.tensor(0))

    def select(self, losses: Tensor, context: TeachingContext) -> Tensor:
        ratio = keep_ratio(context.epoch, float(self.forget_rate), self.gradual_epochs)
        return small_loss_mask(losses, ratio)

    def observe(self, index: Tensor, losses: Tensor, context: TeachingContext) -> None:
        if not self.auto:
            return
        if context.epoch != int(self.loss_epoch):
            # A new epoch: estimate tau from the last one's losses.
            losses_seen = merge_shards(self.epoch_losses)  # every process's samples
            seen = losses_seen[torch.isfinite(losses_seen)]
            self.forget_rate.fill_(estimate_noise_rate(seen))
            self.epoch_losses.fill_(math.nan)
            self.loss_epoch.fill_(context.epoch)
        self.epoch_losses[index] = losses.to(self.epoch_losses.dtype)

"""Barron's general and adaptive robust loss, its shape and scale learned with the student.

References:
    Barron, "A general and adaptive robust loss function", CVPR 2019: the
    loss rho(x, alpha, c) (Eq. 1), and its adaptive form, the negative
    log-likelihood rho(x, alpha, c) + log c + log Z(alpha) (Eqs. 16-17),
    minimized over alpha and c together with the network, alpha in
    (0.001, 1.999) through a sigmoid and c = softplus(.) + 1e-5 as in the
    paper's code. L2T-DLN's classification table compares against it (ARLF).

How it meets classification is not in the slides: here the residuals are the
predicted distribution minus the one-hot label, one per class, each with its
own shape and scale (Barron fits one pair per output dimension); the sample's
loss is the sum of their negative log-likelihoods.
"""

from __future__ import annotations

import math
from functools import cache, partial

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from metateach.data import Batch
from metateach.learning import WithStudent
from metateach.lesson import Lesson
from metateach.registry import TEACHERS
from metateach.teacher import StudentView, Teacher

__all__ = ["AdaptiveRobustLoss", "adaptive_nll", "log_partition", "robust_rho", "shape_of"]

#: The shape's range, as in Barron's code: alpha = 0 (Cauchy) and 2 (L2) are limits there.
ALPHA_RANGE = (0.001, 1.999)
SCALE_FLOOR = 1e-5
#: The log-partition table: 512 knots of the latent l, alpha = lo + (hi - lo) sigmoid(l), on
#: [-12, 12] (alpha within 2e-5 of its range's ends); uniform in l, they crowd where
#: log Z(alpha) bends hardest, near alpha = 2.
_LATENT_RANGE, _KNOTS = 12.0, 512


def shape_of(latent: Tensor) -> Tensor:
    """alpha = lo + (hi - lo) sigmoid(latent), in ALPHA_RANGE."""
    lo, hi = ALPHA_RANGE
    return lo + (hi - lo) * torch.sigmoid(latent)


def scale_of(latent: Tensor) -> Tensor:
    """c = softplus(latent) + SCALE_FLOOR, positive."""
    return F.softplus(latent) + SCALE_FLOOR


def robust_rho(x: Tensor, alpha: Tensor, scale: Tensor) -> Tensor:
    """rho(x, alpha, c) = |alpha - 2| / alpha (((x / c)^2 / |alpha - 2| + 1)^(alpha / 2) - 1),
    for alpha away from 0 and 2 (Eq. 1): 1 is the Charbonnier loss."""
    b = (alpha - 2).abs()
    return b / alpha * (((x / scale) ** 2 / b + 1) ** (alpha / 2) - 1)


@cache
def _partition_table() -> tuple[Tensor, Tensor]:
    """log Z at the knots of the latent, and its slope in the latent, in float64.

    Z(alpha) = integral over R of exp(-rho(x, alpha, 1)), by the trapezoid rule in
    u = log(1 + x) on 20,001 points up to x = 1e9 (the heaviest tail, alpha -> 0, falls as
    2 / x^2: it leaves out 2e-9 of Z's 4.44); 2 x for the symmetric half-lines. Within 1e-7
    of adaptive quadrature (``tests/test_teachers.py``).
    """
    latent = torch.linspace(-_LATENT_RANGE, _LATENT_RANGE, _KNOTS, dtype=torch.float64)
    u = torch.linspace(0.0, math.log1p(1e9), 20_001, dtype=torch.float64)
    x = torch.expm1(u)
    values = []
    for chunk in shape_of(latent).split(64):
        rho = robust_rho(x[None, :], chunk[:, None], torch.ones((), dtype=torch.float64))
        integrand = torch.exp(-rho) * (1 + x)  # dx = (1 + x) du
        values.append(torch.log(2 * torch.trapezoid(integrand, u, dim=1)))
    log_z = torch.cat(values)
    return log_z, torch.gradient(log_z, spacing=(latent,), edge_order=2)[0]


def log_partition(latent: Tensor) -> Tensor:
    """log Z(alpha) at alpha = :func:`shape_of` ``(latent)``, differentiable: a cubic Hermite
    spline through the table (the latent held to its range, where alpha stands still)."""
    log_z, slope = (t.to(latent.device, latent.dtype) for t in _partition_table())
    step = 2 * _LATENT_RANGE / (_KNOTS - 1)
    position = ((latent + _LATENT_RANGE) / step).clamp(0, _KNOTS - 1 - 1e-9)
    i = position.detach().floor().long()
    t = position - i
    h00, h10 = (1 + 2 * t) * (1 - t) ** 2, t * (1 - t) ** 2
    h01, h11 = t * t * (3 - 2 * t), t * t * (t - 1)
    return h00 * log_z[i] + h10 * step * slope[i] + h01 * log_z[i + 1] + h11 * step * slope[i + 1]


def adaptive_nll(
    logits: Tensor, targets: Tensor, latent_alpha: Tensor, latent_scale: Tensor
) -> Tensor:
    """Per sample, the sum over classes of rho(r, alpha, c) + log c + log Z(alpha), r the
    predicted probability minus the one-hot label; alpha and c per class, from their latents."""
    alpha = shape_of(latent_alpha)
    scale = scale_of(latent_scale)
    residual = logits.softmax(dim=1) - F.one_hot(targets, logits.shape[1]).to(logits.dtype)
    nll = robust_rho(residual, alpha, scale) + scale.log() + log_partition(latent_alpha)
    return nll.sum(dim=1)


@TEACHERS.register("adaptive_robust_loss")
class AdaptiveRobustLoss(Teacher):
    """The lesson's loss is Barron's adaptive robust loss on each class's residual; its shape and
    scale learn with the student (:class:`~metateach.learning.WithStudent`), from alpha = 1
    (Charbonnier) and c = 1 as in Barron's code.

    Args:
        num_classes: the student's classes (one shape and scale each).
        alpha_init, scale_init: where they start.
    """

    learns = WithStudent()

    def __init__(self, num_classes: int, alpha_init: float = 1.0, scale_init: float = 1.0) -> None:
        super().__init__()
        lo, hi = ALPHA_RANGE
        if not lo < alpha_init < hi:
            raise ValueError(f"alpha_init must be in ({lo}, {hi}), got {alpha_init}")
        if scale_init <= SCALE_FLOOR:
            raise ValueError(f"scale_init must be > {SCALE_FLOOR}, got {scale_init}")
        share = (alpha_init - lo) / (hi - lo)
        latent_alpha = math.log(share / (1 - share))
        latent_scale = math.log(math.expm1(scale_init - SCALE_FLOOR))
        self.latent_alpha = nn.Parameter(torch.full((num_classes,), latent_alpha))
        self.latent_scale = nn.Parameter(torch.full((num_classes,), latent_scale))

    def shape_and_scale(self) -> tuple[Tensor, Tensor]:
        """alpha and c per class, as the loss uses them now."""
        return shape_of(self.latent_alpha), scale_of(self.latent_scale)

    def forward(self, batch: Batch, view: StudentView) -> Lesson:
        return Lesson(
            loss_fn=partial(
                adaptive_nll, latent_alpha=self.latent_alpha, latent_scale=self.latent_scale
            )
        )

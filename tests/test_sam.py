"""SAM: the perturbation has norm rho, the gradient is taken there, BatchNorm moves once, rho = 0 is the base."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

from metateach.data import Batch
from metateach.engine import BilevelProblem
from metateach.errors import ConfigError
from metateach.models import create_model
from metateach.optim import SAM, build_optimizer, sam_perturbation
from metateach.trainer import Trainer

from .hypergrad_fixtures import context


def student(name: str) -> torch.nn.Module:
    torch.manual_seed(0)
    if name == "mlp":
        return create_model("mlp", 4, (1, 6, 6), {"hidden": [16, 12], "dropout": 0.3})
    return create_model("resnet8", 4, (3, 8, 8), {})


def batches(name: str, count: int = 3) -> list[Batch]:
    g = torch.Generator().manual_seed(1)
    shape = (1, 6, 6) if name == "mlp" else (3, 8, 8)
    return [
        Batch(
            torch.randn(16, *shape, generator=g),
            torch.randint(0, 4, (16,), generator=g),
            torch.arange(16),
        )
        for _ in range(count)
    ]


def problem(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> BilevelProblem:
    return BilevelProblem(model, optimizer, None, None, None, torch.zeros(16, dtype=torch.long))


BASES = {
    "sgd": lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.9, weight_decay=5e-4, nesterov=True),
    "adam": lambda p: torch.optim.Adam(p, lr=1e-3, weight_decay=1e-4),
    # The library's own optimizers: SAM around TorchOpt's AdamW and RMSprop rules.
    "rule-adamw": lambda p: build_optimizer("adamw", p, lr=1e-3, weight_decay=1e-2),
    "rule-rmsprop": lambda p: build_optimizer("rmsprop", p, lr=1e-3, momentum=0.9),
}


@pytest.mark.parametrize("base", list(BASES))
@pytest.mark.parametrize("name", ["mlp", "resnet8"], ids=["mlp-dropout", "resnet8-batchnorm"])
def test_sam_with_rho_zero_is_the_base_optimizer_exactly(name: str, base: str) -> None:
    plain_model, sam_model = student(name), student(name)
    plain = problem(plain_model, BASES[base](plain_model.parameters()))
    sharp = problem(sam_model, SAM(BASES[base](sam_model.parameters()), rho=0.0))
    for run in (plain, sharp):
        torch.manual_seed(5)  # the same dropout draws for both runs
        for t, batch in enumerate(batches(name)):
            run.real_step(batch, context(t))
    for (key, a), b in zip(
        plain_model.state_dict().items(), sam_model.state_dict().values(), strict=True
    ):
        assert torch.equal(a, b), key
    assert str(plain.optimizer.state_dict()) == str(sharp.optimizer.state_dict())


@pytest.mark.parametrize("adaptive", [False, True], ids=["SAM", "ASAM"])
def test_the_perturbation_has_norm_rho(adaptive: bool) -> None:
    g = torch.Generator().manual_seed(2)
    params = [torch.randn(5, 3, generator=g), torch.randn(7, generator=g)]
    grads = [torch.randn(5, 3, generator=g), torch.randn(7, generator=g)]
    eps = sam_perturbation(params, grads, rho=0.05, adaptive=adaptive)
    # SAM's ball is ||e|| <= rho; ASAM's is ||e / |w| || <= rho.
    measured = [e / p.abs() if adaptive else e for e, p in zip(eps, params, strict=True)]
    assert float(torch.cat([m.flatten() for m in measured]).norm()) == pytest.approx(0.05, rel=1e-6)
    # Along the gradient (scaled by |w|^2 for ASAM): first-order ascent.
    assert sum(float((e * g_).sum()) for e, g_ in zip(eps, grads, strict=True)) > 0


def test_the_step_uses_the_gradient_at_the_perturbed_point_and_batchnorm_moves_once() -> None:
    model = student("resnet8")
    reference = copy.deepcopy(model)
    batch = batches("resnet8", 1)[0]
    lr, rho = 0.1, 0.05
    run = problem(model, SAM(torch.optim.SGD(model.parameters(), lr=lr, momentum=0.0), rho=rho))
    run.real_step(batch, context())

    # By hand: epsilon from the gradient at w, the gradient at w + epsilon, a plain step from w.
    params = [p for p in reference.parameters()]
    start = [p.detach().clone() for p in params]
    first = torch.autograd.grad(F.cross_entropy(reference(batch.x), batch.y), params)
    buffers_after_one_pass = {k: v.clone() for k, v in reference.named_buffers()}
    eps = sam_perturbation(start, first, rho)
    with torch.no_grad():
        for p, e in zip(params, eps, strict=True):
            p.add_(e)
    second = torch.autograd.grad(F.cross_entropy(reference(batch.x), batch.y), params)
    for p, w, g in zip(model.parameters(), start, second, strict=True):
        assert torch.allclose(p, w - lr * g, atol=1e-6)
    assert not torch.allclose(second[0], first[0])  # the perturbation changed the gradient
    for key, value in model.named_buffers():
        assert torch.equal(value, buffers_after_one_pass[key]), (
            key
        )  # one update of the running stats


def test_sam_is_a_config_setting_for_students_only(make_config) -> None:
    trainer = Trainer(make_config("optim.sam.rho=0.05", "optim.sam.adaptive=true"))
    assert isinstance(trainer.optimizer, SAM) and trainer.optimizer.adaptive
    assert trainer.fit()["test/acc"] > 0.7
    with pytest.raises(ConfigError, match="not SAM's two-pass step: set optim.sam.rho=0"):
        make_config("optim.sam.rho=0.05", "teacher.name=meta_weight_net")
    with pytest.raises(ConfigError, match=r"teacher.optim.sam.rho must be 0"):
        make_config("teacher.optim.sam.rho=0.05")


def test_a_loaded_sam_still_sets_the_learning_rate_and_state_of_its_base() -> None:
    # load_state_dict replaces the base's param_groups and state; SAM must follow (a resumed
    # run's schedule sets the rate through SAM's groups).
    model = student("mlp")
    sam = SAM(torch.optim.Adam(model.parameters(), lr=1e-3), rho=0.05)
    trained = problem(model, sam)
    trained.real_step(batches("mlp")[0], context())
    other = SAM(torch.optim.Adam(model.parameters(), lr=1e-3), rho=0.05)
    other.load_state_dict(sam.state_dict())
    for group in other.param_groups:
        group["lr"] = 0.5
    assert [g["lr"] for g in other.base.param_groups] == [0.5]
    assert other.state is other.base.state and len(other.state) == len(sam.state) > 0

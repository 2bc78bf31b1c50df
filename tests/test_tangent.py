"""The tangent pass over a recorded forward pass against PyTorch's own forward mode."""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.autograd.forward_ad as fwAD
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call

from metateach.engine.forward_mode import mixed_gradient
from metateach.engine.tangent import ReplayMismatch, recording
from metateach.registry import MODELS
from tests.hypergrad_fixtures import Setup, context


class Zoo(nn.Module):
    """Every operator the replay rules cover, in the variants the rules distinguish."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)  # with a bias
        self.grouped = nn.Conv2d(4, 4, 3, stride=2, padding="valid", groups=2, bias=False)
        self.plain_bn = nn.BatchNorm2d(4, affine=False)
        self.bn = nn.BatchNorm2d(4)
        self.line = nn.Conv1d(4, 3, 2)
        self.bn1d = nn.BatchNorm1d(3)
        self.fc = nn.Linear(9, 5, bias=False)
        self.head = nn.Linear(5, 2)

    def forward(self, x: Tensor) -> Tensor:
        h = F.relu(self.bn(self.conv(x)))
        h = self.plain_bn(self.grouped(h))
        h = F.dropout(h, 0.3, self.training)
        h = self.bn1d(self.line(h.flatten(2)[:, :, :4]))
        return self.head(torch.tanh(self.fc(h.flatten(1))))


def _students() -> dict[str, tuple[nn.Module, Tensor]]:
    g = torch.Generator().manual_seed(0)
    return {
        "zoo": (Zoo(), torch.randn(6, 3, 5, 5, generator=g)),
        "resnet8": (MODELS.get("resnet8")(4, (3, 8, 8)), torch.randn(5, 3, 8, 8, generator=g)),
        "cnn9 (dropout2d)": (
            MODELS.get("cnn9")(4, (3, 28, 28)),
            torch.randn(3, 3, 28, 28, generator=g),
        ),
        "lenet (dropout)": (
            MODELS.get("lenet")(4, (1, 16, 16), hidden=7, dropout=0.5),
            torch.randn(4, 1, 16, 16, generator=g),
        ),
        "mlp": (
            MODELS.get("mlp")(4, (1, 4, 4), hidden=[6, 5]),
            torch.randn(4, 1, 4, 4, generator=g),
        ),
    }


STUDENTS = _students()


def _tangent(
    model: nn.Module, x: Tensor, direction: dict[str, Tensor], record=None
) -> tuple[Tensor, Tensor]:
    """(logits, their tangent) in forward mode, replaying ``record`` if given, dropout from seed 1."""
    params = dict(model.named_parameters())
    buffers = {k: b.clone() for k, b in model.named_buffers()}
    with fwAD.dual_level(), torch.random.fork_rng():
        torch.manual_seed(1)
        duals = {
            k: fwAD.make_dual(p.detach(), direction[k]) if k in direction else p.detach()
            for k, p in params.items()
        }
        if record is None:
            out = functional_call(model, {**duals, **buffers}, (x,))
        else:
            with record.replay():
                out = functional_call(model, {**duals, **buffers}, (x,))
        primal, tangent = fwAD.unpack_dual(out)
        return primal.detach(), tangent.detach()


def _recorded(model: nn.Module, x: Tensor, graph: bool = True):
    buffers = {k: b.clone() for k, b in model.named_buffers()}
    with torch.random.fork_rng(), torch.set_grad_enabled(graph):
        torch.manual_seed(1)
        with recording() as record:
            out = functional_call(model, {**dict(model.named_parameters()), **buffers}, (x,))
    return out, record


def _direction(model: nn.Module) -> dict[str, Tensor]:
    g = torch.Generator().manual_seed(2)
    return {
        k: torch.randn(p.shape, generator=g, dtype=p.dtype) for k, p in model.named_parameters()
    }


@pytest.mark.parametrize("mode", ["train", "eval"])
@pytest.mark.parametrize("name", list(STUDENTS))
def test_replayed_tangent_is_forward_modes(name: str, mode: str) -> None:
    """The tangent of the replay equals forward mode's in float64, BatchNorm in both modes
    and dropout included; the replay's outputs are the recorded pass's."""
    model, x = STUDENTS[name]
    model = model.double().train(mode == "train")
    x = x.double()
    direction = _direction(model)
    out, record = _recorded(model, x)
    assert record is not None and record.calls
    primal, expected = _tangent(model, x, direction)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        replayed, found = _tangent(model, x, direction, record)
    torch.testing.assert_close(found, expected, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(replayed, out.detach(), rtol=0, atol=0)
    torch.testing.assert_close(replayed, primal, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("graph", ["none", "freed"])
def test_batch_norm_without_its_saved_statistics(graph: str) -> None:
    """Batch norm's statistics are taken from its autograd node when it is recorded, and
    outlive the graph's freeing; a pass recorded without a graph computes them again."""
    model, x = STUDENTS["zoo"]
    model = model.double().train()
    x = x.double()
    direction = _direction(model)
    out, record = _recorded(model, x, graph=graph == "freed")
    if graph == "freed":
        out.sum().backward()
    _, expected = _tangent(model, x, direction)
    _, found = _tangent(model, x, direction, record)
    torch.testing.assert_close(found, expected, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("moved", ["bias", "weight"])
def test_a_direction_over_some_parameters(moved: str) -> None:
    """Tangents on the biases only (or the weights only) of the zoo's layers."""
    model, x = STUDENTS["zoo"]
    model = model.double().train()
    x = x.double()
    direction = {k: d for k, d in _direction(model).items() if k.endswith(moved)}
    out, record = _recorded(model, x)
    _, expected = _tangent(model, x, direction)
    _, found = _tangent(model, x, direction, record)
    torch.testing.assert_close(found, expected, rtol=1e-10, atol=1e-10)


def test_the_replay_takes_the_recorded_outputs() -> None:
    """The replay does not compute a recorded operator's output: a changed record changes it."""
    model, x = STUDENTS["resnet8"]
    model = model.double().train()
    direction = _direction(model)
    out, record = _recorded(model, x.double())
    record.calls[-1].output.data.add_(1.0)  # the head's logits
    replayed, _ = _tangent(model, x.double(), direction, record)
    torch.testing.assert_close(replayed, out.detach())
    assert not torch.allclose(
        replayed, functional_call(model, dict(model.named_parameters()), (x.double(),))
    )


def test_a_pass_that_is_not_the_recorded_one_is_refused() -> None:
    model, x = STUDENTS["zoo"]
    model = model.double().train()
    x = x.double()
    direction = _direction(model)
    # Another batch size.
    _, record = _recorded(model, x[:4])
    with pytest.raises(ReplayMismatch, match="input is"):
        _tangent(model, x, direction, record)
    # A weight changed in place since the recording.
    _, record = _recorded(model, x)
    with torch.no_grad():
        model.fc.weight.mul_(1.0)
    with pytest.raises(ReplayMismatch, match="weight is not the recorded one"):
        _tangent(model, x, direction, record)
    # A pass with an operator more than the recorded one.
    _, record = _recorded(model, x)
    record.calls.pop()
    with pytest.raises(ReplayMismatch, match="was not in the recorded pass"):
        _tangent(model, x, direction, record)
    # A recorded pass with an operator more than the replayed one.
    _, record = _recorded(model, x)
    record.calls.append(record.calls[-1])
    with pytest.raises(ReplayMismatch, match="made 8 of the recorded 9"):
        _tangent(model, x, direction, record)


def test_mixed_gradient_falls_back_with_a_warning() -> None:
    """A record the pass does not match: the general forward-mode pass, the same result."""
    setup = Setup(model="resnet8")
    problem = setup.problem()
    batch = setup.batches[0]
    params = problem.params()
    direction = {k: torch.randn_like(p) for k, p in params.items()}
    loss_of = problem.taught_of(batch, context())
    targets = problem.teacher_params()
    rng = problem.rng_state()
    expected = mixed_gradient(problem, batch.x, loss_of, params, direction, targets, rng)
    with recording() as record:
        problem.states(params, batch.x, real=False)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        found = mixed_gradient(problem, batch.x, loss_of, params, direction, targets, rng, record)
    for a, b in zip(found, expected, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)
    with torch.no_grad():
        next(iter(params.values())).mul_(1.0)
    with pytest.warns(RuntimeWarning, match="could not reuse the training forward"):
        found = mixed_gradient(problem, batch.x, loss_of, params, direction, targets, rng, record)
    for a, b in zip(found, expected, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)

"""Students: published sizes, the features -> head split, and internal states."""

from __future__ import annotations

import pytest
import torch
from torch.func import functional_call

from metateach.errors import ConfigError
from metateach.models import create_model
from metateach.registry import MODELS
from metateach.student import Student, StudentStates


def n_params(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize(
    ("name", "millions", "printed_to"),
    # He et al. (2016), Table 6; Zagoruyko and Komodakis (2016), Table 1; rounded as printed there.
    [
        ("resnet20", 0.27, 0.01),
        ("resnet32", 0.46, 0.01),
        ("resnet44", 0.66, 0.01),
        ("resnet56", 0.85, 0.01),
        ("resnet110", 1.7, 0.1),
        ("wrn28_10", 36.5, 0.1),
    ],
)
def test_cifar_students_have_their_published_sizes(
    name: str, millions: float, printed_to: float
) -> None:
    model = create_model(name, 10, (3, 32, 32))
    assert n_params(model) / 1e6 == pytest.approx(millions, abs=printed_to / 2)


def test_lenet_is_caffes_lenet() -> None:
    assert n_params(create_model("lenet", 10, (1, 28, 28))) == 431_080


def test_cnn9_is_co_teachings_network() -> None:
    # Nine 3x3 convolutions with biases and BatchNorm, then a 128 -> 10 head (Han et al. 2018, Table 3).
    def conv(c_in: int, c_out: int) -> int:
        return c_in * c_out * 9 + c_out + 2 * c_out

    widths = [
        (1, 128),
        (128, 128),
        (128, 128),
        (128, 256),
        (256, 256),
        (256, 256),
        (256, 512),
        (512, 256),
        (256, 128),
    ]
    expected = sum(conv(a, b) for a, b in widths) + 128 * 10 + 10
    assert n_params(create_model("cnn9", 10, (1, 28, 28))) == expected
    maps = create_model("cnn9", 10, (3, 32, 32))(torch.randn(2, 3, 32, 32), return_states=True).maps
    assert [tuple(m.shape[1:]) for m in maps] == [(128, 32, 32), (256, 16, 16), (128, 2, 2)]


@pytest.mark.parametrize(
    ("name", "shape", "kwargs"),
    [
        ("resnet8", (3, 32, 32), {}),
        ("resnet8", (3, 15, 13), {}),
        ("cnn9", (1, 28, 28), {}),
        ("cifar_resnet", (3, 32, 32), {"depth": 14}),
        ("wide_resnet", (3, 32, 32), {"depth": 10, "widen": 2, "dropout": 0.3}),
        ("lenet", (1, 28, 28), {}),
        ("mlp", (1, 8, 8), {"hidden": [16, 12]}),
    ],
)
def test_students_split_into_features_and_head(
    name: str, shape: tuple[int, ...], kwargs: dict
) -> None:
    torch.manual_seed(0)
    model = create_model(name, 7, shape, kwargs).eval()
    x = torch.randn(5, *shape)
    logits = model(x)
    assert logits.shape == (5, 7)
    features = model.features(x)
    assert features.shape == (5, model.feature_dim)
    assert torch.allclose(model.head(features), logits, atol=1e-6)
    states = model(x, return_states=True)
    assert isinstance(states, StudentStates)
    assert tuple(tuple(m.shape[1:]) for m in states.maps) == model.map_shapes
    assert torch.allclose(states.logits, logits, atol=1e-6) and torch.allclose(
        states.features, features, atol=1e-6
    )
    assert len(states.maps) >= 1


def test_resnet_exposes_the_last_maps_at_each_resolution() -> None:
    model = create_model("resnet20", 10, (3, 32, 32))
    maps = model(torch.randn(2, 3, 32, 32), return_states=True).maps
    assert [tuple(m.shape[1:]) for m in maps] == [(16, 32, 32), (32, 16, 16), (64, 8, 8)]
    wrn = create_model("wide_resnet", 10, (3, 32, 32), {"depth": 10, "widen": 2})
    assert [m.shape[1] for m in wrn(torch.randn(2, 3, 32, 32), return_states=True).maps] == [
        32,
        64,
        128,
    ]


def test_internal_states_are_reachable_through_functional_call() -> None:
    model = create_model("resnet8", 10, (3, 32, 32)).eval()
    params = {k: v.detach().clone().requires_grad_() for k, v in model.named_parameters()}
    x = torch.randn(3, 3, 32, 32)
    states = functional_call(
        model, {**params, **dict(model.named_buffers())}, (x,), {"return_states": True}
    )
    states.features.sum().backward()
    assert params["conv.weight"].grad is not None
    assert torch.allclose(states.logits, model(x), atol=1e-6)


def test_every_registered_model_builds_a_student() -> None:
    shapes = {"lenet": (1, 28, 28), "mlp": (1, 8, 8), "cnn9": (1, 28, 28)}
    for name in MODELS:
        if name in ("wrn28_10", "wide_resnet", "resnet110"):
            continue  # covered above; large
        model = create_model(name, 3, shapes.get(name, (3, 32, 32)))
        assert isinstance(model, Student) and model.num_classes == 3


def test_an_input_a_model_cannot_take_is_a_config_error() -> None:
    with pytest.raises(
        ConfigError,
        match=r"model 'lenet' \(model.name\) with input \(1, 8, 8\): LeNet needs images of at least 16x16",
    ):
        create_model("lenet", 10, (1, 8, 8))
    with pytest.raises(ConfigError, match="depth must be 6n\\+2, got 33"):
        create_model("cifar_resnet", 10, (3, 32, 32), {"depth": 33})


def test_initialization_follows_the_seed() -> None:
    torch.manual_seed(5)
    a = create_model("resnet8", 10, (3, 32, 32))
    torch.manual_seed(5)
    b = create_model("resnet8", 10, (3, 32, 32))
    assert all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters(), strict=True))

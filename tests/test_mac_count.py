"""The forward-pass MAC count gives fvcore's numbers on what squeezer builds, and fvcore counts where it would not."""
from __future__ import annotations

import subprocess
import sys

import pytest
import torch
from torch import nn

import squeezer.evaluators.mac_count as mac_count
from squeezer.evaluators.cost import count_macs
from squeezer.evaluators.latency import calibration_policies
from squeezer.evaluators.mac_count import forward_macs, mac_counter
from squeezer.policies.apply import apply_policy
from squeezer.spaces.space import SearchSpace


def assert_same_count(model: nn.Module, x: torch.Tensor) -> None:
    traced_total, traced = count_macs(model, x)
    total, per_module = forward_macs(model, x)
    assert total == traced_total > 0
    assert {name: per_module.get(name, 0) for name in traced} == traced


class Attention(nn.Module):
    """Counted ops outside any Conv2d/Linear: attention's projections, and matmuls in forward itself."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 8, 3)
        self.attn = nn.MultiheadAttention(8, 2, batch_first=True)
        self.mix = nn.Parameter(torch.randn(8, 8))
        self.head = nn.Linear(8, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.conv(x).flatten(2).transpose(1, 2)
        y, _ = self.attn(y, y, y)
        y = torch.einsum("btc,cd->btd", y @ self.mix, self.mix)
        return self.head(y.mean(1))


def test_forward_count_equals_fvcore_on_models_with_attention_and_matmuls(mobilenet) -> None:
    assert_same_count(Attention().eval(), torch.randn(1, 1, 8, 8))
    assert_same_count(mobilenet, torch.randn(1, 1, 28, 28))


def test_forward_count_equals_fvcore_on_policies_of_every_knob(trained_resnet, digits, one_thread) -> None:
    """Pruned, decomposed, swapped and quantized units: the modules squeezer builds count as fvcore counts them."""
    x = digits.example_inputs(1)
    space = SearchSpace.from_model(trained_resnet, x)
    calibration = digits.calibration(1)
    for policy in calibration_policies(space, 6, seed=3):
        assert_same_count(apply_policy(trained_resnet, policy, calibration, example_inputs=x, space=space), x)


def test_counter_falls_back_to_fvcore_where_the_counts_differ(resnet, monkeypatch) -> None:
    x = torch.randn(1, 1, 8, 8)
    assert mac_counter(resnet, x) is forward_macs
    monkeypatch.setattr(mac_count, "forward_macs", lambda model, inputs: (1, {"": 1}))
    assert mac_counter(resnet, x) is count_macs

    def fails(model: nn.Module, inputs: torch.Tensor) -> tuple[int, dict[str, int]]:
        raise RuntimeError("an op the dispatch mode cannot run")

    monkeypatch.setattr(mac_count, "forward_macs", fails)
    assert mac_counter(resnet, x) is count_macs


def test_a_counter_watching_the_units_counts_them_and_the_total_as_fvcore(resnet) -> None:
    x = torch.randn(1, 1, 8, 8)
    space = SearchSpace.from_model(resnet, x)
    count = mac_counter(resnet, x, watch=space.units)
    total, per_module = count(resnet, x)
    traced_total, traced = count_macs(resnet, x)
    assert total == traced_total and set(per_module) <= set(space.units)
    assert all(per_module.get(unit, 0) == traced.get(unit, 0) for unit in space.units)


def test_forward_count_leaves_the_model_as_it_was(resnet) -> None:
    x = torch.randn(2, 1, 8, 8)
    with torch.no_grad():
        before = resnet(x)
    forward_macs(resnet, x)
    with torch.no_grad():
        assert torch.equal(resnet(x), before)
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in resnet.modules())


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_forward_count_on_cuda(resnet) -> None:
    x = torch.randn(1, 1, 8, 8)
    assert forward_macs(resnet.cuda(), x.cuda())[0] == count_macs(resnet.cpu(), x)[0]


def test_importing_the_counter_prints_no_deprecation_warning() -> None:
    """fvcore.nn scripts a loss with torch.jit at import, and every squeezer command printed torch's FutureWarning."""
    run = subprocess.run([sys.executable, "-W", "error::FutureWarning", "-c", "import squeezer.evaluators.evaluate"],
                         capture_output=True, text=True)
    assert run.returncode == 0, run.stderr[-2000:]

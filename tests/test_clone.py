"""clone_module must mean what copy.deepcopy means: nothing shared with the original, sharing inside kept."""
from __future__ import annotations

import torch
from torch import nn

from squeezer.models import resnet20
from squeezer.policies.clone import clone_module


class Tied(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(4, 4)
        self.b = nn.Linear(4, 4)
        self.b.weight = self.a.weight
        self.notes: list[str] = ["base"]
        self.register_buffer("scale", torch.ones(4))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.b(self.a(x)) * self.scale


def test_clone_computes_the_same_and_shares_no_tensor_with_the_original() -> None:
    model = resnet20(in_channels=1).eval()
    copy = clone_module(model)
    x = torch.randn(2, 1, 8, 8)
    assert torch.equal(model(x), copy(x))
    originals = {t.data_ptr() for t in list(model.parameters()) + list(model.buffers())}
    assert not originals & {t.data_ptr() for t in list(copy.parameters()) + list(copy.buffers())}
    assert [type(m) for m in model.modules()] == [type(m) for m in copy.modules()]
    with torch.no_grad():
        copy.conv1.weight.zero_()
    copy.train()
    assert model.conv1.weight.abs().sum() > 0 and not model.training


def test_clone_keeps_tied_weights_tied_and_copies_containers_and_hooks() -> None:
    model = Tied()
    model.a.register_forward_hook(lambda module, args, out: out + 1)
    copy = clone_module(model)
    assert copy.b.weight is copy.a.weight and copy.a.weight is not model.a.weight
    x = torch.randn(3, 4)
    assert torch.equal(model(x), copy(x))  # the hook came along
    copy.notes.append("copy")
    copy.b.register_forward_hook(lambda module, args, out: out * 0)
    assert model.notes == ["base"] and not model.b._forward_hooks
    assert not torch.equal(model(x), copy(x))


def test_modules_with_their_own_pickling_are_deep_copied() -> None:
    lstm = nn.LSTM(4, 8)  # defines __setstate__ (flat weights): clone hands it to copy.deepcopy
    copy = clone_module(nn.Sequential(lstm))
    x = torch.randn(5, 1, 4)
    assert torch.equal(lstm(x)[0], copy[0](x)[0])
    assert copy[0].weight_ih_l0 is not lstm.weight_ih_l0

"""Units found by what computes (1-d/3-d and transposed convolutions, embeddings, recurrent layers), token-id
inputs, bounded dependency analysis and export of adaptive poolings: each on a tiny model."""
from __future__ import annotations

import copy
import logging

import numpy as np
import onnxruntime as ort
import pytest
import torch
from torch import nn

from architecture_checks import check_model
from squeezer.policies.apply import apply_policy
from squeezer.policies.export import FixedAdaptiveAvgPool, export_onnx
from squeezer.policies.policy import Policy
from squeezer.spaces import dependency
from squeezer.spaces.space import SearchSpace, SpaceError

KNOBS = ("prune", "rank", "w_bits", "a_bits")


class Conv1dNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Conv1d(4, 16, 3, padding=1), nn.BatchNorm1d(16), nn.ReLU(),
                                  nn.Conv1d(16, 32, 3, stride=2), nn.ReLU(), nn.AdaptiveAvgPool1d(1), nn.Flatten(),
                                  nn.Linear(32, 5))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x)


class Decoder(nn.Module):
    """A strided encoder and a transposed-convolution decoder back to the input size (segmentation-like)."""

    def __init__(self) -> None:
        super().__init__()
        self.enc = nn.Sequential(nn.Conv2d(3, 16, 3, stride=2, padding=1), nn.ReLU())
        self.dec = nn.Sequential(nn.ConvTranspose2d(16, 16, 4, stride=2, padding=1), nn.ReLU(), nn.Conv2d(16, 2, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dec(self.enc(x))


class Conv3dNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Conv3d(2, 16, 3, padding=1), nn.ReLU(), nn.Conv3d(16, 8, 3),
                                  nn.AdaptiveAvgPool3d(1), nn.Flatten(), nn.Linear(8, 3))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x)


class TokenNet(nn.Module):
    """Token ids -> embedding -> a stacked bidirectional recurrent layer -> a classifier on the last step."""

    def __init__(self, recurrent: type[nn.RNNBase]) -> None:
        super().__init__()
        self.embed = nn.Embedding(50, 16)
        self.rnn = recurrent(16, 24, num_layers=2, batch_first=True, bidirectional=True)
        self.head = nn.Linear(48, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.rnn(self.embed(x))[0][:, -1])


CASES = {
    "conv1d": (Conv1dNet, lambda: torch.randn(1, 4, 20)),
    "tconv": (Decoder, lambda: torch.randn(1, 3, 16, 16)),
    "conv3d": (Conv3dNet, lambda: torch.randn(1, 2, 6, 6, 6)),
    "lstm": (lambda: TokenNet(nn.LSTM), lambda: torch.randint(0, 50, (1, 7))),
    "gru": (lambda: TokenNet(nn.GRU), lambda: torch.randint(0, 50, (1, 7))),
}


@pytest.mark.parametrize("name", CASES)
def test_every_computing_layer_is_a_priced_unit(name: str, one_thread) -> None:
    build, inputs = CASES[name]
    model = build()
    row = check_model(name, build, inputs(), policies=4, knobs=KNOBS)
    assert row.ok, row.problems
    expected = {n for n, m in model.named_modules() if isinstance(m, (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear,
                                                                       nn.ConvTranspose2d, nn.Embedding, nn.RNNBase))}
    assert row.units == len(expected)
    assert all(m > 0 for m, _ in row.macs)


def test_recurrent_and_embedding_cost_is_their_weights_per_step() -> None:
    model, x = TokenNet(nn.LSTM), torch.randint(0, 50, (1, 7))
    space = SearchSpace.from_model(model, x)
    rnn = space.units["rnn"]
    # 2 layers x 2 directions x 4 gates x 24 hidden x (inputs + 24): layer 1 reads 16, layer 2 reads 48.
    weights = 2 * 4 * 24 * (16 + 24) + 2 * 4 * 24 * (48 + 24)
    assert space.layer_cost(rnn, 16, 24) == (7 * weights, weights + 2 * 2 * 2 * 4 * 24)
    assert space.layer_cost(space.units["embed"], 50, 16) == (0, 50 * 16)
    assert set(space.units["embed"].knobs) == {"rank"} and not rnn.knobs  # only knobs with an applier for them


def test_a_low_rank_embedding_is_a_narrower_table_and_a_linear() -> None:
    model, x = TokenNet(nn.LSTM).eval(), torch.randint(0, 50, (2, 7))
    space = SearchSpace.from_model(model, x)
    rank = space.choices("embed", "rank")[-1]
    policy = Policy.from_params({"embed/rank": rank}, space)
    applied = apply_policy(model, policy, example_inputs=x, space=space)
    rows, up = applied.embed
    assert isinstance(rows, nn.Embedding) and isinstance(up, nn.Linear) and rows.embedding_dim == up.in_features < 16
    assert space.predict(policy.layers).macs == space.baseline().macs + 7 * up.in_features * 16
    full = copy.deepcopy(model)
    full.embed.weight.data = (rows.weight @ up.weight.T).detach()  # the factors multiply back to the table used
    assert torch.allclose(full(x), applied(x), atol=1e-5)


def test_token_ids_pass_through_quantization() -> None:
    model, x = TokenNet(nn.GRU).eval(), torch.randint(0, 50, (3, 7))
    space = SearchSpace.from_model(model, x)
    policy = Policy.from_params({"head/w_bits": 4, "head/a_bits": 8}, space)
    applied = apply_policy(model, policy, calibration=[x], example_inputs=x, space=space)
    assert applied(x).shape == (3, 4)
    assert "QuantizedLayer" in type(applied.head).__name__


class PooledNet(nn.Module):
    def __init__(self, pool: nn.Module) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, stride=4)
        self.pool = pool
        self.fc = nn.Linear(4 * 7 * 7, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.pool(self.conv(x)).flatten(1))


def test_uneven_adaptive_average_pooling_exports_as_the_same_averages() -> None:
    model, x = PooledNet(nn.AdaptiveAvgPool2d(7)).eval(), torch.randn(2, 3, 20, 22)  # 5x5 -> 7x7: not a multiple
    SearchSpace.from_model(model, x)
    fixed = FixedAdaptiveAvgPool((5, 5), (7, 7))
    features = model.conv(x)
    assert torch.allclose(fixed(features), model.pool(features), atol=1e-6)
    session = ort.InferenceSession(export_onnx(model, x[:1]), providers=["CPUExecutionProvider"])
    got = session.run(None, {"input": x.numpy()})[0]
    np.testing.assert_allclose(got, model(x).detach().numpy(), atol=1e-5)


def test_uneven_adaptive_max_pooling_is_refused_at_space_build_naming_the_layer() -> None:
    with pytest.raises(SpaceError, match="layer 'pool' .*AdaptiveMaxPool2d.* 5x5 .*use inputs"):
        SearchSpace.from_model(PooledNet(nn.AdaptiveMaxPool2d(7)), torch.randn(1, 3, 20, 22))


def test_a_group_whose_analysis_grows_too_large_is_unprunable_with_a_log_line(monkeypatch, caplog) -> None:
    # A flatten turns each of the conv's channels into 5x5 features; with the limit below that is too many.
    monkeypatch.setattr(dependency, "MAX_INDICES", 50)
    with caplog.at_level(logging.WARNING, logger="squeezer.spaces.graph"):
        space = SearchSpace.from_model(PooledNet(nn.Identity()).eval(), torch.randn(1, 3, 28, 28))
    assert not space.groups["conv"].prunable and "too large" in space.groups["conv"].note
    assert "channel group conv is not prunable" in caplog.text
    assert "conv/prune" not in space.distributions() and "conv/w_bits" in space.distributions()


class FixedWidth(nn.Module):
    """A forward that hard-codes its channel count, which the dependency graph cannot see."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Conv2d(3, 16, 3)
        self.b = nn.Conv2d(3, 16, 3)
        self.head = nn.Conv2d(16, 2, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.a(x)
        return self.head(self.b(x) + y.reshape(y.shape[0], 4, 4, *y.shape[2:]).flatten(1, 2))


def test_a_group_whose_smallest_option_breaks_the_forward_is_unprunable(caplog) -> None:
    with caplog.at_level(logging.WARNING, logger="squeezer.spaces.graph"):
        space = SearchSpace.from_model(FixedWidth().eval(), torch.randn(1, 3, 8, 8))
    broken = [g for g in space.groups.values() if "breaks the forward" in g.note]
    assert broken and not any(g.prunable for g in broken)
    assert f"channel group {broken[0].name} is not prunable" in caplog.text

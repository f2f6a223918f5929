"""Transformers: attention rewritten exactly, heads and MLP width pruned physically, attention priced, ONNX export."""
from __future__ import annotations

import random

import numpy as np
import pytest
import torch
import torchvision
from torch import nn

from architecture_checks import check_model, random_policy
from squeezer.evaluators.cost import count_macs, measure_cost
from squeezer.evaluators.latency import LatencyMeter
from squeezer.evaluators.mac_count import forward_macs, mac_counter
from squeezer.policies.apply import apply_policy
from squeezer.policies.export import export_onnx
from squeezer.policies.policy import Policy
from squeezer.spaces.attention import HeadAttention, explicit_attention
from squeezer.spaces.space import SearchSpace


def tiny_vit() -> nn.Module:
    return torchvision.models.VisionTransformer(image_size=32, patch_size=8, num_layers=2, num_heads=4, hidden_dim=64,
                                                mlp_dim=128, num_classes=10)


class TinyEncoder(nn.Module):
    """A user's own model around nn.TransformerEncoder (tokens of 16 features in, 10 classes out)."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Linear(16, 64)
        self.encoder = nn.TransformerEncoder(nn.TransformerEncoderLayer(64, 4, 128, dropout=0.0, batch_first=True), 2)
        self.head = nn.Linear(64, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.encoder(self.embed(x)).mean(dim=1))


MODELS = {"vit": (tiny_vit, (1, 3, 32, 32)), "encoder": (TinyEncoder, (1, 12, 16))}


def _model(name: str) -> tuple[nn.Module, torch.Tensor]:
    torch.manual_seed(0)
    build, shape = MODELS[name]
    return build().eval(), torch.randn(*shape)


@pytest.mark.parametrize("batch_first", [True, False])
def test_head_attention_computes_what_multihead_attention_does(batch_first: bool) -> None:
    torch.manual_seed(0)
    mha = nn.MultiheadAttention(16, 4, batch_first=batch_first, kdim=12, vdim=12).eval()
    explicit = HeadAttention.from_mha(mha).eval()
    q, kv = torch.randn(2, 5, 16), torch.randn(2, 7, 12)
    if not batch_first:
        q, kv = q.transpose(0, 1), kv.transpose(0, 1)
    padding = torch.zeros(2, 7, dtype=torch.bool)
    padding[1, -2:] = True
    for kwargs in ({}, {"attn_mask": torch.rand(5, 7) > 0.8, "key_padding_mask": padding},
                   {"attn_mask": torch.randn(8, 5, 7), "average_attn_weights": False}):
        want, got = mha(q, kv, kv, **kwargs), explicit(q, kv, kv, **kwargs)
        assert torch.allclose(want[0], got[0], atol=1e-5) and torch.allclose(want[1], got[1], atol=1e-5)
    encoder = TinyEncoder().eval()
    x = torch.randn(2, 6, 16)
    with torch.no_grad():
        assert torch.allclose(encoder(x), explicit_attention(encoder)(x), atol=1e-5)
    assert isinstance(encoder.encoder.layers[0].self_attn, nn.MultiheadAttention)  # the user's model is untouched


@pytest.mark.parametrize("name", list(MODELS))
def test_the_space_offers_heads_and_mlp_width_and_keeps_the_embedding(name: str) -> None:
    model, x = _model(name)
    space = SearchSpace.from_model(model, x)
    attentions = [u for u in space.units.values() if u.layer.kind == "attention"]
    assert len(attentions) == 2 and all(u.knobs["heads"] == (0.0, 0.25, 0.5, 0.75) for u in attentions)
    pruned = {n for n, u in space.units.items() if "prune" in u.knobs}
    assert len(pruned) == 2 and all(n.endswith(("mlp.0", "linear1")) for n in pruned)  # the MLP hidden widths
    linears = [n for n, u in space.units.items() if u.layer.kind == "linear"]
    assert len(linears) == 13 + (name == "encoder")
    assert all({"w_bits", "rank"} <= set(space.units[n].knobs) for n in linears)
    notes = {g.note for g in space.groups.values() if not g.prunable}
    assert "the embedding width attention reads and writes: kept" in notes


@pytest.mark.parametrize("name", list(MODELS))
def test_base_attention_is_priced_as_its_explicit_form(name: str) -> None:
    model, x = _model(name)
    predicted = SearchSpace.from_model(model, x).baseline().macs  # the explicit form's count: check_model below
    assert count_macs(model, x)[0] == forward_macs(model, x)[0] == predicted
    assert mac_counter(model, x) is forward_macs  # the quick count agrees with fvcore's module by module


@pytest.mark.parametrize("name", list(MODELS))
def test_random_heads_and_mlp_policies_apply_and_are_priced_exactly(name: str, one_thread) -> None:
    build, shape = MODELS[name]
    row = check_model(name, build, torch.randn(*shape), policies=2, knobs=("prune", "heads", "rank"))
    assert row.ok and len(row.macs) == 3 and row.macs[1][0] < row.macs[0][0], row.problems


def test_heads_leave_physically_and_every_linear_quantizes_into_onnx(one_thread) -> None:
    model, x = _model("encoder")
    space = SearchSpace.from_model(model, x)
    first, second = "encoder.layers.0.self_attn", "encoder.layers.1.self_attn"
    params = {f"{n}/w_bits": 8 for n, u in space.units.items() if "w_bits" in u.knobs}
    policy = Policy.from_params({**params, f"{first}/heads": 0.5, f"{second}/heads": 0.75}, space)
    applied = apply_policy(model, policy, example_inputs=x, space=space)
    attention = applied.get_submodule(first)
    assert attention.num_heads == 2 and attention.q_proj.layer.out_features == 32
    assert attention.out_proj.layer.in_features == 32 and applied.get_submodule(second).num_heads == 1
    cost, measured = space.predict(policy.layers), measure_cost(applied, x, policy, space)
    assert measured["macs"] == cost.macs and measured["bops"] == pytest.approx(cost.bops)
    assert forward_macs(applied, x)[0] == cost.macs
    import onnxruntime as ort

    files = []
    for net in (model, applied):  # the unapplied model too: its fused attention is exported in explicit form
        files.append(export_onnx(net, x))
        session = ort.InferenceSession(files[-1], providers=["CPUExecutionProvider"])
        got = session.run(None, {session.get_inputs()[0].name: x.numpy()})[0]
        with torch.no_grad():
            want = net(x).numpy()
        # int8 weights run through onnxruntime's integer kernels: within 1% of the output's scale
        assert np.abs(got - want).max() <= 1e-2 * np.abs(want).max(), np.abs(got - want).max()
    timed = LatencyMeter(files[0], tuple(x.shape), runs=20).measure(files[1])
    assert timed.median_ms > 0 and timed.rel > 0


def test_random_policies_with_every_knob_keep_the_output(one_thread) -> None:
    model, x = _model("vit")
    space = SearchSpace.from_model(model, x)
    policy = random_policy(space, random.Random(1), ("prune", "heads", "rank", "w_bits", "a_bits"))
    applied = apply_policy(model, policy, example_inputs=x, space=space)
    with torch.no_grad():
        assert applied(x).shape == (1, 10)

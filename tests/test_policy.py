"""Policy files: JSON round trip, validation errors, and hypothesis-generated files."""
from __future__ import annotations

import json

import pytest
import torch
from hypothesis import HealthCheck, given, settings, strategies as st

from squeezer.policies.apply import apply_policy
from squeezer.policies.policy import LayerChoice, Policy, PolicyError
from squeezer.spaces.space import SearchSpace
from squeezer.models import resnet20

X8 = torch.randn(1, 1, 8, 8)
MODEL = resnet20(num_classes=10, in_channels=1).eval()
SPACE = SearchSpace.from_model(MODEL, X8)


def test_json_round_trip(tmp_path) -> None:
    policy = Policy.from_params({"layer1.0.conv1/prune": 0.5, "layer2.0.conv1/w_bits": 4,
                                 "fc/a_bits": 8, "layer3.0.conv1/rank": 0.5}, SPACE, source="test")
    path = policy.save(tmp_path / "p.json")
    loaded = Policy.load(path)
    assert loaded == policy
    assert loaded.to_params() == policy.to_params()
    assert json.loads(path.read_text())["version"] == 1


def test_block_swap_drops_rank_of_same_unit() -> None:
    policy = Policy.from_params({"layer1.0.conv1/block": "dwsep", "layer1.0.conv1/rank": 0.5}, SPACE)
    assert policy.layers["layer1.0.conv1"] == LayerChoice(block="dwsep")


@pytest.mark.parametrize("edit,message", [
    (lambda d: d["layers"].update({"layer9.conv": {"prune": 0.5}}), "not in the model"),
    (lambda d: d["layers"].update({"layer1.0.conv1": {"prune": 0.33}}), "not offered"),
    (lambda d: d["layers"].update({"layer1.0.conv2": {"prune": 0.5}}), "not offered"),
    (lambda d: d["layers"].update({"layer1.0.conv1": {"sparsity": 0.5}}), "unknown knob"),
    (lambda d: d["layers"].update({"layer1.0.conv1": {"w_bits": "four"}}), "must be a int"),
    (lambda d: d.update(version=99), "version 99 is not supported"),
    (lambda d: d.update(format="other"), "not a squeezer policy"),
    (lambda d: d.update(fingerprint="0123456789abcdef"), "another model"),
    (lambda d: d.update(layers=[1, 2]), "must be an object"),
    (lambda d: d.update(channel_round=4), "rounds kept channels to multiples of 4, the space to 8"),
    (lambda d: d.update(channel_round="8"), "'channel_round' must be a whole number"),
])
def test_bad_policy_files_give_one_line_errors(tmp_path, edit, message) -> None:
    data = Policy.from_params({"layer1.0.conv1/prune": 0.5}, SPACE).to_json()
    edit(data)
    path = tmp_path / "bad.json"
    path.write_text(json.dumps(data))
    with pytest.raises(PolicyError, match=message) as info:
        Policy.load(path).validate(SPACE)
    assert "\n" not in str(info.value)


def test_corrupted_and_missing_files(tmp_path) -> None:
    path = tmp_path / "broken.json"
    path.write_text('{"format": "squeezer.policy", ')
    with pytest.raises(PolicyError, match="not valid JSON"):
        Policy.load(path)
    with pytest.raises(PolicyError, match="does not exist"):
        Policy.load(tmp_path / "missing.json")


def test_misspelt_unit_suggests_the_right_one() -> None:
    with pytest.raises(PolicyError, match="did you mean 'layer1.0.conv1'"):
        Policy(layers={"layer1.0.cov1": LayerChoice(prune=0.5)}).validate(SPACE)


knob_values = st.fixed_dictionaries({}, optional={
    "prune": st.one_of(st.sampled_from([0.0, 0.5, 0.75, 0.3]), st.floats(allow_nan=True), st.text(max_size=3)),
    "w_bits": st.one_of(st.sampled_from([2, 4, 8, 32, 7]), st.booleans(), st.none()),
    "a_bits": st.sampled_from([4, 8, 32, 16]),
    "rank": st.one_of(st.sampled_from([1.0, 0.5, 0.25, 0.3]), st.integers(-2, 2)),
    "block": st.sampled_from(["keep", "dwsep", "bottleneck"]),
    "bogus": st.integers(),
})
unit_names = st.one_of(st.sampled_from(list(SPACE.units)), st.text(max_size=12))
policy_files = st.one_of(
    st.fixed_dictionaries({
        "format": st.sampled_from(["squeezer.policy", "x"]),
        "version": st.sampled_from([1, 1, 1, 2, "1"]),
        "fingerprint": st.sampled_from([SPACE.fingerprint, "", "abc", 5]),
        "layers": st.one_of(st.dictionaries(unit_names, knob_values, max_size=4), st.lists(st.integers())),
    }),
    st.lists(st.integers()), st.none(), st.text(),
)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=policy_files)
def test_generated_policy_files_apply_or_fail_cleanly(tmp_path_factory, data) -> None:
    path = tmp_path_factory.mktemp("p") / "policy.json"
    path.write_text(json.dumps(data))
    try:
        policy = Policy.load(path).validate(SPACE)
    except PolicyError as exc:
        assert str(exc) and "\n" not in str(exc)
        return
    model = apply_policy(MODEL, policy, example_inputs=X8, space=SPACE, distill_steps=5)
    assert model(X8).shape == (1, 10)


def test_a_policy_applies_at_the_channel_rounding_it_was_made_with() -> None:
    from squeezer.spaces.knobs import SpaceConfig

    fine = SearchSpace.from_model(MODEL, X8, SpaceConfig(round_to=4))
    policy = Policy.from_params({"conv1/prune": 0.75, "layer3.0.conv1/prune": 0.875}, fine)
    loaded = Policy.from_json(json.loads(json.dumps(policy.to_json())))
    assert loaded.channel_round == 4 and loaded == policy
    # applied without a space, it rebuilds the one it was made in: 4 of the stem's 16 channels, 8 of 64
    model = apply_policy(MODEL, loaded, example_inputs=X8)
    assert model.conv1.out_channels == 4 and model.layer3[0].conv1.out_channels == 8
    assert Policy.from_json({**policy.to_json(), "channel_round": None}).channel_round is None  # older files

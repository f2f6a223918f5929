"""Distillation beyond logits: FitNets hints and attention transfer on the unchanged model's features, and recovery
on images without labels."""
from __future__ import annotations

import copy
import json
from dataclasses import replace
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import pytest
import torch

from squeezer.datasets import load_data, recovery_on
from squeezer.evaluators.accuracy import recover
from squeezer.evaluators.data import DataConfig
from squeezer.evaluators.feature_match import FeatureMatch, stage_ends
from squeezer.evaluators.settings import EvalSettings, RecoveryConfig
from squeezer.image_folders import NO_LABEL
from squeezer.policies.apply import apply_policy
from squeezer.search.baselines import uniform_at
from squeezer.search.config import RunConfig, SearchError, check_resume, run_from_json, run_to_json
from squeezer.spaces.space import SearchSpace

pytestmark = pytest.mark.usefixtures("one_thread")  # many small ops: see conftest


@pytest.fixture(scope="module")
def pruned(trained_resnet, digits) -> torch.nn.Module:
    """The trained ResNet-20 pruned uniformly to a quarter of its MACs (stage outputs narrowed too)."""
    x = digits.example_inputs(1)
    space = SearchSpace.from_model(trained_resnet, x)
    return apply_policy(trained_resnet, uniform_at(space, 0.25), digits.calibration(), example_inputs=x, space=space)


def no_hooks(model: torch.nn.Module) -> bool:
    return not any(m._forward_hooks for m in model.modules())


def test_attention_transfer_and_hints_are_zero_for_identical_models(resnet, mobilenet, digits) -> None:
    x = digits.train.head(4)
    assert stage_ends(resnet, x) == ("layer1", "layer2", "layer3")  # the attention-transfer paper's groups
    assert len(stage_ends(mobilenet, x)) >= 2
    twin = copy.deepcopy(resnet)
    with FeatureMatch(twin, resnet, x) as match:
        assert match.names == ("layer1", "layer2", "layer3") and match.widened == 0  # equal widths: no adapter
        twin(x), resnet(x)
        hint, at = match.losses()
        assert float(hint) == 0.0 and float(at) == 0.0
        with torch.no_grad():
            twin.layer2[0].conv1.weight.mul_(-1)
        twin(x)
        hint, at = match.losses()
        assert float(hint) > 0 and float(at) > 0  # and not zero for a different student
    assert no_hooks(twin) and no_hooks(resnet)


def test_hint_loss_falls_during_recovery_and_adapters_are_not_in_the_saved_model(trained_resnet, pruned,
                                                                                 digits) -> None:
    with FeatureMatch(pruned, trained_resnet, digits.train.head(4)) as match:
        assert match.widened == 3  # every stage end is narrower after pruning: each gets a 1x1 adapter
    keys = set(pruned.state_dict())
    terms: list[dict[str, float]] = []
    config = RecoveryConfig(mode="finetune", finetune_steps=12, batch_size=32, hint_weight=10.0)
    model = recover(copy.deepcopy(pruned), config, digits, teacher=trained_resnet,
                    on_terms=lambda step, t: terms.append(dict(t)))
    hints = [t["hint"] for t in terms]
    assert len(hints) == 12 and np.mean(hints[-3:]) < 0.9 * np.mean(hints[:3]), hints
    assert set(model.state_dict()) == keys  # the adapters trained with it and were dropped
    assert no_hooks(model) and no_hooks(trained_resnet)


class _NoLabels:
    """Stands in for labels: any use raises."""

    def __getattr__(self, name: str) -> Any:
        raise AssertionError(f"recovery read a label ({name})")


class _Unlabelled:
    """A training split whose images read as usual and whose labels raise when touched."""

    def __init__(self, split: Any) -> None:
        self.split = split

    def __len__(self) -> int:
        return len(self.split)

    @property
    def y(self) -> torch.Tensor:
        raise AssertionError("recovery read the labels")

    @property
    def sample_shape(self) -> tuple[int, ...]:
        return self.split.sample_shape

    def head(self, n: int) -> torch.Tensor:
        return self.split.head(n)

    def batches(self, batch_size: int, **kwargs: Any) -> Iterator[tuple[torch.Tensor, Any]]:
        for x, _ in self.split.batches(batch_size, **kwargs):
            yield x, _NoLabels()


def test_unlabelled_recovery_never_reads_labels(trained_resnet, pruned, digits) -> None:
    data = replace(digits, train=_Unlabelled(digits.train))
    kd = RecoveryConfig(mode="kd", finetune_steps=2, batch_size=16, unlabelled=True, at_weight=50.0)
    for config in (kd, replace(kd, mode="finetune"), replace(kd, mode="bn", bn_batches=1)):
        recover(copy.deepcopy(pruned), config, data, teacher=trained_resnet)
    with pytest.raises(AssertionError, match="recovery read a label"):  # the trap springs on a labelled fine-tune
        recover(copy.deepcopy(pruned), replace(kd, unlabelled=False), data, teacher=trained_resnet)


def test_a_folder_of_images_without_labels_is_what_recovery_reads(tmp_path: Path, digits) -> None:
    from PIL import Image

    folder = tmp_path / "unlabelled"
    (folder / "more").mkdir(parents=True)
    for i in range(6):
        pixels = (np.asarray(digits.train.x[i, 0]) * 40 + 128).clip(0, 255).astype(np.uint8)
        Image.fromarray(pixels).save(folder / ("more" if i % 2 else "") / f"{i}.png")
    bundle = load_data("digits", config=DataConfig(recovery_data=str(folder)))
    assert len(bundle.train) == 6 and set(bundle.train.labels) == {NO_LABEL}  # flat and nested, names ignored
    x, _ = next(bundle.train.batches(6, augment=False))
    assert tuple(x.shape) == (6, 1, 8, 8)  # read as the digits are: their size, their statistics
    assert len(bundle.val) == len(digits.val) and len(bundle.test) == len(digits.test)  # still labelled
    assert recovery_on(RecoveryConfig(), DataConfig(recovery_data=str(folder))).unlabelled
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="holds no images"):
        load_data("digits", config=DataConfig(recovery_data=str(tmp_path / "empty")))


def test_the_run_records_the_distillation_and_a_resume_with_other_weights_is_refused(tmp_path: Path) -> None:
    recovery = RecoveryConfig(mode="kd", hint_weight=10.0, at_weight=50.0, hint_layers=("layer2", "layer3"),
                              unlabelled=True)
    run = RunConfig(model="m.pt", data="digits", fingerprint="f", eval=EvalSettings(recovery=recovery),
                    data_config=DataConfig(recovery_data="images"))
    data = json.loads(json.dumps(run_to_json(run)))
    assert data["eval"]["recovery"]["hint_weight"] == 10.0 and data["eval"]["recovery"]["unlabelled"] is True
    assert data["data_config"]["recovery_data"] == str(Path("images").absolute())
    back = run_from_json(data)  # the search's space settings come back resolved, so compare what this test set
    assert (back.eval, back.data_config) == (run.eval, run.data_config)
    check_resume(data, run_to_json(run), out=tmp_path)
    lighter = replace(run, eval=EvalSettings(recovery=replace(recovery, at_weight=0.0)))
    with pytest.raises(SearchError, match="at_weight 50.0 there, None now"):
        check_resume(data, run_to_json(lighter), out=tmp_path)
    with pytest.raises(ValueError, match="at_weight weighs a feature loss"):
        RecoveryConfig(at_weight=-1)


def test_the_cli_passes_the_distillation_options_and_refuses_them_without_training(monkeypatch, capsys) -> None:
    import squeezer
    from squeezer.cli import main

    given: dict[str, Any] = {}

    def search_policies(*args: Any, **kwargs: Any) -> None:
        given.update(kwargs)
        raise KeyboardInterrupt  # stop before rendering: only the arguments matter here

    monkeypatch.setattr(squeezer, "search_policies", search_policies)
    main(["search", "--model", "resnet20", "--budget", "macs<=50%", "--out", "x", "--recovery", "kd",
          "--hint-weight", "10", "--at-weight", "50", "--hint-layers", "layer2,layer3", "--unlabelled",
          "--recovery-data", "images"])
    r = given["recovery"]
    assert (r.hint_weight, r.at_weight, r.hint_layers, r.unlabelled) == (10.0, 50.0, ("layer2", "layer3"), True)
    assert given["data_config"].recovery_data == str(Path("images").absolute())
    given.clear()
    monkeypatch.setattr(squeezer, "apply", search_policies)
    main(["apply", "runs/x", "--trial", "1", "--out", "s.pt", "--hint-weight", "10", "--hint-layers", "layer3"])
    assert (given["hint_weight"], given["at_weight"], given["hint_layers"], given["unlabelled"]) == (
        10.0, None, ("layer3",), None)  # None: as the run recovered
    monkeypatch.undo()
    capsys.readouterr()
    code = main(["search", "--model", "resnet20", "--budget", "macs<=50%", "--out", "x", "--hint-weight", "1"])
    err = capsys.readouterr().err
    assert code == 2 and len(err.strip().splitlines()) == 1 and "use --recovery kd or finetune" in err, err

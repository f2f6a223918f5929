"""The apply job: a found policy on a fresh copy of the model, recovered as the search did, re-measured and saved."""
from __future__ import annotations

from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from torch import nn

from squeezer.datasets import load_data, recovery_on
from squeezer.devices import check_device
from squeezer.evaluators.data import DataConfig
from squeezer.evaluators.evaluate import EvalSettings, Evaluator
from squeezer.evaluators.accuracy import recover
from squeezer.evaluators.finetune import evaluate
from squeezer.evaluators.measurement import Measurement
from squeezer.inspection import load_result
from squeezer.models import compressed_recipe, resolve_source, save_checkpoint, weights_preprocessing
from squeezer.policies.export import export_onnx, with_metadata
from squeezer.policies.policy import Policy
from squeezer.progress import progress_bar
from squeezer.run_folder import BASE_FILE, abs_ref, read_run
from squeezer.search.records import TrialRecord
from squeezer.spaces.knobs import KNOBS, PRUNE, SpaceConfig
from squeezer.spaces.space import SearchSpace

__all__ = ["ApplySummary", "apply"]


@dataclass
class ApplySummary:
    """The compressed model as saved, its measurement now, and what the search recorded for it (if it came from one).
    `model` is the compressed module itself (on the CPU, in eval mode), as `squeezer.load(out)` rebuilds it."""

    out: Path
    onnx: Path | None
    policy: str
    measured: Measurement
    recorded: TrialRecord | None
    base: Measurement | None
    test_accuracy: float
    finetuned: bool
    inputs: dict[str, Any] = field(default_factory=dict)  # how raw images are preprocessed (DataBundle.preprocessing)
    model: nn.Module | None = field(default=None, repr=False)


def _trial_policy(result: Any, run: Path, trial: int) -> tuple[Policy, TrialRecord]:
    row = next((r for r in result.rows if r.number == trial), None)
    if row is None or row.policy is None:
        numbers = [r.number for r in result.completed()]
        shown = f"{min(numbers)}..{max(numbers)}" if numbers else "none yet"
        raise LookupError(f"trial {trial} is not a finished trial of {str(run)!r} (trials {shown}): pick one from "
                          f"`squeezer front {run}`")
    if not row.completed:
        raise LookupError(f"trial {trial} of {str(run)!r} did not complete ({row.fail_reason or row.state.name}): "
                          f"pick one from `squeezer front {run}`")
    return row.policy, row


def apply(run: str | Path | None = None, *, trial: int | None = None, policy: str | Path | None = None,
          model: str | None = None, data: str | None = None, out: str | Path, onnx: str | Path | None = None,
          finetune_steps: int = 0, device: str = "cpu", latency: bool | None = None, progress: bool = False,
          weights: str | Path | None = None, trust_pickle: bool = False, model_check: bool = True,
          data_config: DataConfig | None = None, hint_weight: float | None = None, at_weight: float | None = None,
          hint_layers: tuple[str, ...] | None = None, unlabelled: bool | None = None) -> ApplySummary:
    """Apply a found policy to a fresh copy of the model, recover it as the search did, re-measure and save it;
    returns the summary, whose `model` is the compressed module.

    Latency is timed again (`latency=None`) unless the run measured none (`--latency none`): a number the search
    never compared would only cost time. The saved file is the compressed state_dict with its recipe (the base
    model's architecture and weights, and the policy), which `squeezer.load` rebuilds without unpickling code. A
    policy must name the model it was made for (its fingerprint) unless `model_check` is off; a pickled model file
    loads only with `trust_pickle`. The run's data is read as the search read it (preprocessing, file division,
    validation samples; `data_config` overrides what it sets), and test accuracy is reported on the whole test
    split. `hint_weight`, `at_weight`, `hint_layers` and `unlabelled` replace the run's (`RecoveryConfig`; None:
    as the run recovered) for its recovery and the `finetune_steps` fine-tune, distilled as the run's kd is."""
    check_device(device)
    if finetune_steps < 0:
        raise ValueError(f"finetune_steps must be 0 or more, got {finetune_steps}")
    if trial is not None and trial < 0:
        raise ValueError(f"trial must be 0 or more, got {trial}")
    if (trial is None) == (policy is None):
        raise ValueError("pass exactly one of --trial N (with a run folder) or --policy FILE")
    settings = EvalSettings()
    data_config, split = data_config or DataConfig(), None
    recorded, searched = None, SpaceConfig()
    result = load_result(run) if run is not None else None
    if run is not None:
        info = read_run(run)
        settings, searched = info.eval, info.search.space
        base_file = Path(run) / BASE_FILE
        if model is None and not base_file.is_file():
            weights = weights or info.weights  # the run's model is rebuilt with the weights it recorded
        model = model or (str(base_file) if base_file.is_file() else info.model)
        if data is None or abs_ref(data) == info.data:
            data_config, split = data_config.resumed(info.data_config), info.data_split
        data = data or info.data
    if trial is not None:
        if run is None:
            raise ValueError("--trial needs the run folder it belongs to: squeezer apply RUN --trial N --out FILE")
        chosen, recorded = _trial_policy(result, Path(run), trial)
    else:
        chosen = Policy.load(policy)
    if model is None:
        raise ValueError("no model to apply the policy to: pass a run folder or --model")
    data = data or "digits"
    if latency is None:
        latency = settings.latency.mode != "none"
    given = {k: v for k, v in (("hint_weight", hint_weight), ("at_weight", at_weight), ("hint_layers", hint_layers),
                                ("unlabelled", unlabelled)) if v is not None}
    settings = replace(settings, device=device, recovery=recovery_on(replace(settings.recovery, **given), data_config),
                       latency=replace(settings.latency, mode="measure" if latency else "none"))
    fits = finetune_steps > 0 or settings.recovery.mode in ("finetune", "kd")
    if settings.recovery.matches_features and not fits:
        raise ValueError(f"hint and attention-transfer weights train the compressed model, which recovery "
                         f"{settings.recovery.mode!r} does not: add --finetune-steps N")
    implied = weights_preprocessing(model, str(weights)) if weights is not None else None
    bundle = load_data(data, config=data_config, split=split, implied=implied)
    net, recipe = resolve_source(model, bundle, weights=weights, trust_pickle=trust_pickle)
    # every knob, at the policy's own channel rounding, offering the run's pruning ratios as well as the defaults
    grid = tuple(sorted({*searched.grid(PRUNE), *KNOBS[PRUNE].grid}))
    space = SearchSpace.from_model(net, bundle.example_inputs(),
                                   SpaceConfig(round_to=chosen.channel_round or searched.round_to,
                                               choices={PRUNE: grid}))
    evaluator = Evaluator(net, bundle, settings, space=space)
    if not model_check:  # the user vouches that the policy was made for this model
        chosen = replace(chosen, fingerprint="")
    chosen.validate(evaluator.space, require_fingerprint=model_check)
    compressed = evaluator.compress(chosen)
    if finetune_steps > 0:  # distilled as the run's kd is: its weights, temperature and feature losses
        tune = replace(settings.recovery, mode="kd")
        teacher, seed = evaluator.base_model, settings.seed
        if progress:
            bar, update = progress_bar(finetune_steps, "fine-tuning")
            with bar:
                compressed = recover(compressed, tune, bundle, teacher=teacher, seed=seed, device=device,
                                     steps=finetune_steps, on_step=update)
        else:
            compressed = recover(compressed, tune, bundle, teacher=teacher, seed=seed, device=device,
                                 steps=finetune_steps)
    measured = evaluator.measure(compressed, chosen, latency=latency)
    if not isinstance(measured, Measurement):
        raise RuntimeError(f"the compressed model could not be measured: {measured.reason}")
    test_accuracy, _ = evaluate(compressed, bundle.test, device=device)
    compressed = compressed.cpu().eval()
    made = compressed_recipe(net, recipe, policy=chosen.to_json(), input_shape=bundle.input_shape)
    out_path = save_checkpoint(compressed, out, recipe=made, data=bundle.name, val_accuracy=measured.accuracy,
                               test_accuracy=test_accuracy, **bundle.preprocessing())
    onnx_path = None
    if onnx is not None:
        onnx_path = Path(onnx)
        onnx_path.parent.mkdir(parents=True, exist_ok=True)
        onnx_path.write_bytes(with_metadata(export_onnx(compressed, bundle.example_inputs()), bundle.preprocessing()))
    base = result.base if result is not None else None
    if base is None:  # no search recorded it: measure the unchanged model the same way
        base = evaluator.measure(evaluator.base_model, Policy(fingerprint=evaluator.space.fingerprint),
                                 latency=latency)
    return ApplySummary(out=Path(out_path), onnx=onnx_path, policy=chosen.summary(), measured=measured,
                        recorded=recorded, base=base if isinstance(base, Measurement) else None,
                        test_accuracy=test_accuracy, finetuned=finetune_steps > 0, inputs=bundle.preprocessing(),
                        model=compressed)

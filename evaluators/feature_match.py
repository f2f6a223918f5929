"""Distillation beyond logits: FitNets hints and attention transfer on intermediate features of the unchanged model.

The teacher is the unchanged model and the student the compressed one. The appliers change modules in place or
nest what replaces a layer under its name (pruned convolutions, quantized wrappers, low-rank factors, swapped
blocks), so a feature is matched by module name: the output of the same-named module in both models, caught by
forward hooks during the fine-tune's own forward passes, so nothing runs twice.

- Hint (Romero et al., FitNets): the mean squared error between the teacher's feature and the student's, through a
  1x1 convolution (FitNets' regressor) where pruning left the student narrower. The adapters train with the student
  and are dropped with the hooks when the fine-tune ends: the saved model is the compressed model alone.
- Attention transfer (Zagoruyko & Komodakis): the squared error between spatial attention maps, each the channel
  mean of squared activations, flattened and L2-normalised per sample, summed over the matched points as the paper
  sums over groups (its beta/2 is the weight). A map does not depend on width, so it needs no adapter, and it is
  zero when the features are equal.

The points matched by default are the stage ends, as attention transfer takes group outputs: for each spatial
resolution the model's feature maps pass through, the last module to finish at that resolution (ResNet-20's
layer1..layer3, torchvision ResNets' layer1..layer4, a MobileNet's last block at each stride). A point the student
no longer has (replaced under another name) or whose spatial size changed is not matched.
"""
from __future__ import annotations

import fnmatch
from typing import Any, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from squeezer.policies.forward import run_hooked

__all__ = ["FeatureMatch", "attention_loss", "attention_map", "stage_ends"]


def attention_map(feature: torch.Tensor) -> torch.Tensor:
    """(N, H*W): the channel mean of squared activations, flattened and L2-normalised per sample."""
    return F.normalize(feature.pow(2).mean(1).flatten(1), dim=1)


def attention_loss(student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    """Mean squared difference of the two attention maps (the attention-transfer paper's reference code)."""
    return (attention_map(student) - attention_map(teacher)).pow(2).mean()


def _feature_maps(model: nn.Module, example: torch.Tensor) -> dict[str, torch.Tensor]:
    """{name: output} of the modules called once on `example` whose output is a spatial feature map (N x C x H x W
    with H x W > 1), in the order they finish."""
    outputs: dict[str, Any] = {}
    calls: dict[str, int] = {}

    def hook(name: str) -> Any:
        def record(module: nn.Module, args: tuple, out: Any) -> None:
            calls[name] = calls.get(name, 0) + 1
            outputs.pop(name, None)
            outputs[name] = out
        return record

    run_hooked(model, [(m, hook(n)) for n, m in model.named_modules() if n], [example])
    return {n: o for n, o in outputs.items() if calls[n] == 1 and isinstance(o, torch.Tensor) and o.dim() == 4
            and o.shape[2] * o.shape[3] > 1}


def _least_squares(student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    """The 1x1 convolution weight mapping `student` features to `teacher` ones with the least squared error (ridge
    regularised: a few images may give fewer pixels than channels). Why: a random adapter's first gradients push
    the student's features anywhere; started here, the hint pulls them towards the teacher's from the first step."""
    s = student.transpose(0, 1).flatten(1).double()  # C_s x pixels
    t = teacher.transpose(0, 1).flatten(1).double()
    gram = s @ s.T
    ridge = 1e-3 * gram.diagonal().mean().clamp_min(1e-12) * torch.eye(len(gram), dtype=gram.dtype)
    return torch.linalg.solve(gram + ridge, s @ t.T).T.float()[:, :, None, None]  # C_t x C_s x 1 x 1


def stage_ends(model: nn.Module, example: torch.Tensor) -> tuple[str, ...]:
    """The last module to finish at each spatial resolution of `model`'s feature maps, in forward order."""
    return _ends(_feature_maps(model, example))


def _ends(maps: dict[str, torch.Tensor]) -> tuple[str, ...]:
    last = {tuple(o.shape[2:]): n for n, o in maps.items()}  # later modules overwrite earlier ones
    ends = set(last.values())
    return tuple(n for n in maps if n in ends)


def _chosen(maps: dict[str, torch.Tensor], patterns: Sequence[str]) -> tuple[str, ...]:
    """The feature-map modules `patterns` (names or fnmatch patterns) name, in forward order."""
    chosen = []
    for pattern in patterns:
        hits = [n for n in maps if fnmatch.fnmatchcase(n, pattern)]
        if not hits:
            raise ValueError(f"hint layer {pattern!r} names no module of the unchanged model that outputs a feature "
                             f"map: give module names such as {', '.join(list(maps)[-3:])}")
        chosen += hits
    return tuple(n for n in maps if n in set(chosen))


class FeatureMatch(nn.Module):
    """The matched points of a student and its teacher, the hint adapters, and the forward hooks that catch both
    models' features; a context manager that removes the hooks on exit (the adapters are dropped with it).

    `layers`: names or fnmatch patterns of the teacher's modules to match (empty: its stage ends)."""

    def __init__(self, student: nn.Module, teacher: nn.Module, example: torch.Tensor, *,
                 layers: Sequence[str] = ()) -> None:
        super().__init__()
        t_maps = _feature_maps(teacher, example)
        s_maps = _feature_maps(student, example)
        wanted = _chosen(t_maps, layers) if layers else _ends(t_maps)
        self.names = tuple(n for n in wanted if n in s_maps and s_maps[n].shape[2:] == t_maps[n].shape[2:])
        if not self.names:
            raise ValueError(f"no feature of the unchanged model ({', '.join(wanted) or 'none'}) is kept under its "
                             "name and size by the compressed model: name others with hint_layers (--hint-layers)")
        # FitNets' regressor, where widths differ: from the student's channels to the teacher's
        self.adapters = nn.ModuleList([self._adapter(s_maps[n], t_maps[n]) for n in self.names])
        self._started = False
        self._student: dict[str, torch.Tensor] = {}
        self._teacher: dict[str, torch.Tensor] = {}
        self._handles = [self._catch(model, self._student if model is student else self._teacher)
                         for model in (student, teacher)]

    @staticmethod
    def _adapter(student: torch.Tensor, teacher: torch.Tensor) -> nn.Module:
        if student.shape[1] == teacher.shape[1]:
            return nn.Identity()
        return nn.Conv2d(student.shape[1], teacher.shape[1], 1, bias=False).to(student.device)

    @torch.no_grad()
    def _start_adapters(self) -> None:
        """Each adapter at the least-squares map on the first training batch's features (in training mode: the
        compressed model's BatchNorm statistics are stale until it trains)."""
        for name, adapter in zip(self.names, self.adapters):
            if isinstance(adapter, nn.Conv2d):
                weight = _least_squares(self._student[name].detach().cpu(), self._teacher[name].detach().cpu())
                adapter.weight.copy_(weight)
        self._started = True

    def _catch(self, model: nn.Module, into: dict[str, torch.Tensor]) -> list[Any]:
        modules = dict(model.named_modules())

        def hook(name: str) -> Any:
            def record(module: nn.Module, args: tuple, out: torch.Tensor) -> None:
                into[name] = out
            return record

        return [modules[n].register_forward_hook(hook(n)) for n in self.names]

    @property
    def widened(self) -> int:
        """How many points go through an adapter (the student is narrower there)."""
        return sum(not isinstance(a, nn.Identity) for a in self.adapters)

    def losses(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(hint, attention transfer) of the features both models' last forward passes left. The hint is each
        point's squared error relative to the teacher feature's mean square (so one weight suits every layer and
        model, whatever its activations' scale), averaged over the points; attention transfer is summed over them."""
        if not self._started:
            self._start_adapters()
        pairs = [(self._student[n], self._teacher[n].detach()) for n in self.names]
        hint = torch.stack([F.mse_loss(a(s), t) / t.pow(2).mean().clamp_min(1e-12)
                            for a, (s, t) in zip(self.adapters, pairs)]).mean()
        at = torch.stack([attention_loss(s, t) for s, t in pairs]).sum()
        return hint, at

    def close(self) -> None:
        for handles in self._handles:
            for handle in handles:
                handle.remove()
        self._handles = []
        self._student.clear()
        self._teacher.clear()

    def __enter__(self) -> FeatureMatch:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

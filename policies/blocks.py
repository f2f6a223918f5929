"""Block swap: a k x k convolution becomes a compact block, fitted to mimic it.

The depthwise-separable swap (depthwise k x k -> BatchNorm -> pointwise 1 x 1) is described below; the other
families (policies/block_families.py) start from their own closed-form fit of the kernel, get their BatchNorms set
from the data like dwsep, then have their last convolution(s) re-solved by least squares on the same calibration
inputs and targets, and take the same optional Adam steps.

The swapped block starts from the best rank-1-per-input-channel fit of the original kernel (a depthwise-separable
conv is exactly that factorisation), then is fitted on a few calibration batches. Each block sees the inputs it
actually gets in the partly swapped model and is fitted to the output the unit had before any swap (in the model
as pruned and decomposed), so errors of earlier swaps are corrected instead of compounding, and pruning composes.

The fit is closed-form: the block's output is linear in the pointwise weights for a fixed depthwise kernel and
linear in the depthwise kernel for fixed pointwise weights, so one alternating least-squares sweep solves each
exactly, far faster and closer than gradient steps per block (benchmarks/RESULTS.md, dwsep_apply.py). Optional
Adam steps (`distill_steps`) can follow; after the closed-form fit they barely lower the error, hence the default 0.
"""
from __future__ import annotations

import copy
import math

import torch
from torch import nn
from torch.nn import functional as F

from squeezer.policies.block_families import family_block, heads
from squeezer.policies.context import ApplyContext
from squeezer.policies.forward import run_hooked
from squeezer.policies.lowrank import set_submodule
from squeezer.policies.policy import Policy
from squeezer.spaces.block_shapes import DWSEP, KEEP, parse_block

__all__ = ["apply_blocks", "dwsep_block", "swap_block", "refit", "refit_heads", "distill", "block_error",
           "set_block_bn_stats"]

LEARNING_RATE = 1e-3
FIT_BATCHES = 4  # calibration batches a block is fitted on: the cost grows linearly, the error barely falls after
SWEEPS = 1  # alternating least-squares sweeps; more overfit the calibration batches on small data
MAX_DEPTHWISE_UNKNOWNS = 2304  # cin*kh*kw up to which the depthwise kernel is re-solved (a solve is its cube)
DEPTHWISE_MACS = 1e9  # budget of the depthwise normal matrix; positions are subsampled evenly beyond it
RIDGE = 1e-3  # relative to a normal matrix's mean diagonal; 1e-6 let 1 x 1-resolution solves blow up
CHUNK = 1 << 24  # elements of an unfolded input processed at once
TARGET_BYTES = 256 << 20  # targets of all swapped units gathered in one pass up to this size, else one unit at a time


def apply_blocks(model: nn.Module, policy: Policy, ctx: ApplyContext) -> nn.Module:
    """Swap every unit whose block is not "keep" for its fitted block (in place)."""
    names = [n for n in ctx.space.units if n in policy.layers and policy.layers[n].block != KEEP]  # forward order
    if not names:
        return model
    fit = bool(ctx.calibration)
    batches = ctx.calibration[:FIT_BATCHES] if fit else [ctx.example_inputs]
    before = copy.deepcopy(model).eval() if fit else None  # its unit outputs are the targets
    samples = sum(len(b) for b in batches)
    target_bytes = sum(4 * samples * ctx.space.units[n].layer.out_channels * ctx.space.units[n].layer.positions
                       for n in names)
    # One pass gathers every target when they fit in memory (the unit outputs of `before` never change).
    stored = capture_all_outputs(before, names, batches) if fit and target_bytes <= TARGET_BYTES else {}
    for index, name in enumerate(names):
        value = policy.layers[name].block
        student = swap_block(model.get_submodule(name), value, ctx.space.config.round_to)
        set_submodule(model, name, student)
        inputs = capture_inputs(model, student, batches)
        set_stats = set_bn_stats if value == DWSEP else set_block_bn_stats
        set_stats(student, inputs)
        if before is None:
            continue
        targets = stored.pop(name, [])
        if len(targets) != len(inputs):  # not gathered, or a module called more than once per pass
            targets = capture_outputs(before, before.get_submodule(name), batches)
        (refit if value == DWSEP else refit_heads)(student, inputs, targets)
        if ctx.distill_steps > 0:
            torch.manual_seed(ctx.seed + index)
            distill(student, inputs, targets, ctx.distill_steps)
            set_stats(student, inputs)
    return model.eval()


def swap_block(conv: nn.Conv2d, value: str, round_to: int) -> nn.Sequential:
    """The block `value` names ("dwsep", "invres:2", ...) for `conv`, initialised in closed form from its weights."""
    choice = parse_block(value)
    if choice is None or choice.family == KEEP:
        raise ValueError(f"block {value!r} names no swap")
    return dwsep_block(conv) if choice.family == DWSEP else family_block(conv, choice, round_to)


def dwsep_block(conv: nn.Conv2d) -> nn.Sequential:
    """Depthwise k x k (stride, padding, dilation of `conv`) -> BatchNorm -> pointwise 1 x 1 (bias of `conv`).

    Initialised with the rank-1 SVD of each input channel's (cout x kh*kw) slice of the kernel, which is the
    depthwise-separable kernel closest to the original; the BatchNorm starts as the identity.
    """
    if not isinstance(conv, nn.Conv2d) or conv.groups != 1:
        raise TypeError(f"a dwsep swap needs an ungrouped Conv2d, got {conv!r}")
    w = conv.weight.detach()
    cout, cin, kh, kw = w.shape
    depthwise = nn.Conv2d(cin, cin, conv.kernel_size, conv.stride, conv.padding, conv.dilation, groups=cin,
                          bias=False, padding_mode=conv.padding_mode)
    bn = nn.BatchNorm2d(cin)
    pointwise = nn.Conv2d(cin, cout, 1, bias=conv.bias is not None)
    slices = w.double().permute(1, 0, 2, 3).reshape(cin, cout, kh * kw)
    u, s, vh = torch.linalg.svd(slices, full_matrices=False)  # batched over input channels
    root = s[:, :1].sqrt()
    with torch.no_grad():
        depthwise.weight.copy_((root * vh[:, 0, :]).reshape(cin, 1, kh, kw))
        pointwise.weight.copy_((u[:, :, 0] * root).T.reshape(cout, cin, 1, 1))
        if conv.bias is not None:
            pointwise.bias.copy_(conv.bias.detach())
        bn.weight.fill_(1.0)
        bn.bias.zero_()
        bn.running_mean.zero_()
        bn.running_var.fill_(1.0 - bn.eps)
    return nn.Sequential(depthwise, bn, pointwise).to(w.device).eval()


class _Stop(Exception):
    """Raised by a hook to end a forward pass once the wanted tensor has been seen."""


def capture_inputs(model: nn.Module, module: nn.Module, batches: list[torch.Tensor]) -> list[torch.Tensor]:
    """The input `module` receives for each batch run through `model` (the rest of the forward pass is skipped)."""
    return _capture(model, module, batches, output=False)


def capture_outputs(model: nn.Module, module: nn.Module, batches: list[torch.Tensor]) -> list[torch.Tensor]:
    """The output of `module` for each batch run through `model` (the rest of the forward pass is skipped)."""
    return _capture(model, module, batches, output=True)


def capture_all_outputs(model: nn.Module, names: list[str],
                        batches: list[torch.Tensor]) -> dict[str, list[torch.Tensor]]:
    """The outputs of the named modules for each batch, in one forward pass per batch."""
    captured: dict[str, list[torch.Tensor]] = {n: [] for n in names}
    run_hooked(model, [(model.get_submodule(n),  # clone: an in-place op may follow the module
                        lambda _m, _i, out, n=n: captured[n].append(out.detach().clone())) for n in names], batches)
    return captured


def _capture(model: nn.Module, module: nn.Module, batches: list[torch.Tensor], output: bool) -> list[torch.Tensor]:
    captured: list[torch.Tensor] = []

    def pre_hook(_: nn.Module, inputs: tuple) -> None:
        captured.append(inputs[0].detach())
        raise _Stop

    def hook(_: nn.Module, inputs: tuple, result: torch.Tensor) -> None:
        captured.append(result.detach())
        raise _Stop

    handle = module.register_forward_hook(hook) if output else module.register_forward_pre_hook(pre_hook)
    try:
        with torch.no_grad():
            for batch in batches:
                try:
                    model.eval()(batch)
                except _Stop:
                    pass
    finally:
        handle.remove()
    return captured


@torch.no_grad()
def set_bn_stats(block: nn.Sequential, inputs: list[torch.Tensor]) -> None:
    """Give the block's BatchNorm the true statistics of its input without changing what the block computes.

    The BN runs in eval mode throughout (as when deployed), so the new running mean/variance are compensated in
    its affine weight and bias.
    """
    depthwise, bn = block[0], block[1]
    if not inputs:
        return
    outputs = torch.cat([depthwise(x).transpose(0, 1).flatten(1) for x in inputs], dim=1)  # C x (N*H*W)
    _retarget_bn(bn, outputs.mean(1), outputs.var(1, unbiased=outputs.shape[1] > 1))


@torch.no_grad()
def _retarget_bn(bn: nn.BatchNorm2d, mean: torch.Tensor, var: torch.Tensor) -> None:
    """Give `bn` the input statistics (mean, var) while its eval-mode output stays the same function of its input."""
    old_std = (bn.running_var + bn.eps).sqrt()
    new_std = (var + bn.eps).sqrt()
    bn.bias.add_(bn.weight * (mean - bn.running_mean) / old_std)
    bn.weight.mul_(new_std / old_std)
    bn.running_mean.copy_(mean)
    bn.running_var.copy_(var)


@torch.no_grad()
def set_block_bn_stats(block: nn.Module, inputs: list[torch.Tensor]) -> None:
    """`set_bn_stats` for every BatchNorm of any block: the statistics of its input, what the block computes
    unchanged (each BN's input is gathered in one pass; changing one BN leaves what later ones see unchanged)."""
    norms = [m for m in block.modules() if isinstance(m, nn.BatchNorm2d)]
    if not inputs or not norms:
        return
    sums: dict[nn.Module, list[torch.Tensor]] = {}

    def hook(module: nn.Module, args: tuple) -> None:
        x = args[0].transpose(0, 1).flatten(1).double()
        total = sums.setdefault(module, [x.new_zeros(len(x)), x.new_zeros(len(x)), x.new_zeros(())])
        total[0] += x.sum(1)
        total[1] += x.pow(2).sum(1)
        total[2] += x.shape[1]

    handles = [m.register_forward_pre_hook(hook) for m in norms]
    try:
        for x in inputs:
            block(x)
    finally:
        for h in handles:
            h.remove()
    for bn, (first, second, count) in sums.items():
        mean = first / count
        var = ((second - count * mean.pow(2)) / (count - 1).clamp_min(1)).clamp_min(0).to(bn.running_var.dtype)
        _retarget_bn(bn, mean.to(bn.running_mean.dtype), var)


def refit_heads(block: nn.Module, inputs: list[torch.Tensor], targets: list[torch.Tensor]) -> float:
    """Least-squares fit of the block's last convolution(s) to `targets`, the rest held; returns the error.

    Exact for what it solves (the output is linear in the last layer's weights), so the error on these batches
    cannot rise; the start is kept if rounding says otherwise, and a head whose padding the unfolded solve cannot
    reproduce (a string or a non-zero padding mode) keeps its start.
    """
    start = copy.deepcopy(block.state_dict())
    before = block_error(block, inputs, targets)
    for conv, channels in heads(block):
        if conv.padding_mode != "zeros" or isinstance(conv.padding, str):
            continue
        seen: list[torch.Tensor] = []
        handle = conv.register_forward_pre_hook(lambda _m, args: seen.append(args[0].detach()))
        try:
            with torch.no_grad():
                for x in inputs:
                    block(x)
        finally:
            handle.remove()
        _fit_conv(conv, seen, [y[:, channels] for y in targets])
    after = block_error(block, inputs, targets)
    if not after <= before:  # also catches NaN
        block.load_state_dict(start)
        return before
    return after


@torch.no_grad()
def _fit_conv(conv: nn.Conv2d, inputs: list[torch.Tensor], targets: list[torch.Tensor]) -> None:
    """Weights (and bias) of a possibly grouped conv minimising the squared error to `targets`, group by group,
    from the normal equations of its unfolded inputs."""
    groups, k = conv.groups, conv.weight[0, 0].numel()
    per_in, per_out = conv.in_channels // groups, conv.out_channels // groups
    bias = conv.bias is not None
    n = per_in * k + int(bias)
    device = conv.weight.device
    gram = torch.zeros(groups, n, n, dtype=torch.float64, device=device)
    cross = torch.zeros(groups, n, per_out, dtype=torch.float64, device=device)
    for x, y in zip(inputs, targets):
        per_sample = conv.in_channels * k * y.shape[2] * y.shape[3]
        for xs, ys in zip(x.split(max(1, CHUNK // per_sample)), y.split(max(1, CHUNK // per_sample))):
            cols = F.unfold(xs, conv.kernel_size, conv.dilation, conv.padding, conv.stride)  # N x (cin*k) x L
            cols = cols.reshape(len(xs), groups, per_in * k, -1).permute(1, 0, 3, 2).reshape(groups, -1, per_in * k)
            if bias:
                cols = torch.cat([cols, cols.new_ones(groups, cols.shape[1], 1)], dim=2)
            outs = ys.reshape(len(ys), groups, per_out, -1).permute(1, 0, 3, 2).reshape(groups, -1, per_out)
            gram += (cols.transpose(1, 2) @ cols).double()
            cross += (cols.transpose(1, 2) @ outs).double()
    current = conv.weight.reshape(groups, per_out, per_in * k).transpose(1, 2)
    if bias:
        current = torch.cat([current, conv.bias.reshape(groups, 1, per_out)], dim=1)
    solution = torch.stack([_solve(gram[g], cross[g], current[g]) for g in range(groups)])  # groups x n x per_out
    if bias:
        conv.bias.copy_(solution[:, -1].reshape(-1))
        solution = solution[:, :-1]
    conv.weight.copy_(solution.transpose(1, 2).reshape(conv.weight.shape))


def refit(block: nn.Sequential, inputs: list[torch.Tensor], targets: list[torch.Tensor],
          sweeps: int = SWEEPS) -> float:
    """Least-squares fit of `block` to `targets`: pointwise, depthwise, then pointwise again; returns the error.

    Each solve is exact for the other factor held fixed, so the error on these batches cannot rise (the start is
    kept if rounding says otherwise). The BatchNorm is re-fitted to the new depthwise output after each sweep
    without changing what the block computes, so it still normalises as a deployed BN would.
    """
    start = copy.deepcopy(block.state_dict())
    before = block_error(block, inputs, targets)
    depthwise = block[0]
    solvable = (depthwise.padding_mode == "zeros" and not isinstance(depthwise.padding, str)
                and depthwise.in_channels * depthwise.weight[0].numel() <= MAX_DEPTHWISE_UNKNOWNS)
    for _ in range(sweeps):
        _fit_pointwise(block, inputs, targets)
        if solvable:
            _fit_depthwise(block, inputs, targets)
            set_bn_stats(block, inputs)
    _fit_pointwise(block, inputs, targets)
    after = block_error(block, inputs, targets)
    if not after <= before:  # also catches NaN
        block.load_state_dict(start)
        return before
    return after


def _solve(gram: torch.Tensor, rhs: torch.Tensor, current: torch.Tensor) -> torch.Tensor:
    """argmin |Z w - y|^2 + ridge |w - current|^2 from the normal equations (gram = Z^T Z, rhs = Z^T y).

    The ridge pulls towards the current weights rather than zero: with fewer positions than unknowns (a 512-wide
    pointwise conv at 1 x 1 resolution) the data alone leave the solution free to blow up.
    """
    ridge = RIDGE * float(gram.diagonal().mean().clamp_min(1e-12))
    eye = torch.eye(len(gram), dtype=gram.dtype, device=gram.device)
    return torch.linalg.solve(gram + ridge * eye, rhs + ridge * current.to(gram.dtype).reshape(rhs.shape))


@torch.no_grad()
def _fit_pointwise(block: nn.Sequential, inputs: list[torch.Tensor], targets: list[torch.Tensor]) -> None:
    """Pointwise weights (and bias) minimising the squared error, given the depthwise conv and BN."""
    depthwise, bn, pointwise = block
    cin, cout, bias = pointwise.in_channels, pointwise.out_channels, pointwise.bias is not None
    n = cin + int(bias)
    gram = torch.zeros(n, n, dtype=torch.float64, device=pointwise.weight.device)
    cross = torch.zeros(n, cout, dtype=torch.float64, device=pointwise.weight.device)
    for x, y in zip(inputs, targets):
        z = bn(depthwise(x)).permute(0, 2, 3, 1).reshape(-1, cin)
        if bias:
            z = torch.cat([z, z.new_ones(len(z), 1)], dim=1)
        gram += (z.T @ z).double()
        cross += (z.T @ y.permute(0, 2, 3, 1).reshape(-1, cout)).double()
    current = pointwise.weight.flatten(1).T
    if bias:
        current = torch.cat([current, pointwise.bias[None, :]])
    solution = _solve(gram, cross, current)
    if bias:
        pointwise.bias.copy_(solution[-1])
        solution = solution[:-1]
    pointwise.weight.copy_(solution.T.reshape(pointwise.weight.shape))


@torch.no_grad()
def _fit_depthwise(block: nn.Sequential, inputs: list[torch.Tensor], targets: list[torch.Tensor]) -> None:
    """Depthwise kernel minimising the squared error, given the BN (as an affine map) and the pointwise weights.

    With P = pointwise weights scaled by the BN scale, the output is P applied to each channel's kernel times its
    input patches, so the normal matrix is (P^T P)[c, d] * <patches of c, patches of d>: one Gram of unfolded
    inputs, weighted channel-pair-wise.
    """
    depthwise, bn, pointwise = block
    cin, k = depthwise.in_channels, depthwise.weight[0].numel()
    scale = bn.weight / (bn.running_var + bn.eps).sqrt()
    shift = bn.bias - bn.running_mean * scale
    mix = pointwise.weight.flatten(1).double()  # cout x cin
    p = mix * scale.double()[None, :]
    offset = mix @ shift.double() + (pointwise.bias.double() if pointwise.bias is not None else 0.0)
    device = depthwise.weight.device
    gram = torch.zeros(cin * k, cin * k, dtype=torch.float64, device=device)
    rhs = torch.zeros(cin, k, dtype=torch.float64, device=device)
    positions = sum(y.numel() // y.shape[1] for y in targets)
    stride = max(1, math.ceil((cin * k) ** 2 * positions / DEPTHWISE_MACS))
    for x, y in zip(inputs, targets):
        per_sample = cin * k * y.shape[2] * y.shape[3]
        for xs, ys in zip(x.split(max(1, CHUNK // per_sample)), y.split(max(1, CHUNK // per_sample))):
            cols = F.unfold(xs, depthwise.kernel_size, depthwise.dilation, depthwise.padding, depthwise.stride)
            cols = cols.reshape(len(xs), cin * k, -1).transpose(0, 1).reshape(cin * k, -1)[:, ::stride]
            residual = ys.transpose(0, 1).reshape(ys.shape[1], -1)[:, ::stride].double() - offset[:, None]
            back = (p.T @ residual).to(cols.dtype)  # cin x positions
            gram += (cols @ cols.T).double()
            rhs += torch.bmm(cols.reshape(cin, k, -1), back[:, :, None]).squeeze(-1).double()
    pair = (p.T @ p).repeat_interleave(k, 0).repeat_interleave(k, 1)
    solution = _solve(gram * pair, rhs.reshape(-1), depthwise.weight)
    depthwise.weight.copy_(solution.reshape(depthwise.weight.shape))


def distill(student: nn.Module, inputs: list[torch.Tensor], targets: list[torch.Tensor], steps: int) -> float:
    """Fit `student` to `targets` on `inputs` (MSE, Adam, batches cycled); returns the final relative error.

    Keeps the starting weights if training made the error on the calibration batches worse.
    """
    student.eval()  # BN keeps the statistics set from the data: the block trained is the block deployed
    params = [p for p in student.parameters()]
    for p in params:
        p.requires_grad_(True)
    start = copy.deepcopy(student.state_dict())
    before = block_error(student, inputs, targets)
    optimizer = torch.optim.Adam(params, lr=LEARNING_RATE)
    with torch.enable_grad():
        for step in range(steps):
            x, y = inputs[step % len(inputs)], targets[step % len(inputs)]
            optimizer.zero_grad(set_to_none=True)
            loss = F.mse_loss(student(x), y)
            loss.backward()
            optimizer.step()
    after = block_error(student, inputs, targets)
    if after > before:
        student.load_state_dict(start)
        after = before
    return after


@torch.no_grad()
def block_error(module: nn.Module, inputs: list[torch.Tensor], targets: list[torch.Tensor]) -> float:
    """Relative L2 error of `module` on `inputs` against `targets` (0 is exact, 1 is as bad as outputting zeros)."""
    err = sum(float((module(x) - y).pow(2).sum()) for x, y in zip(inputs, targets))
    ref = sum(float(y.pow(2).sum()) for y in targets)
    return (err / ref) ** 0.5 if ref > 0 else err ** 0.5

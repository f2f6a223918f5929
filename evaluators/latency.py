"""Latency of an exported model in onnxruntime, measured so that two numbers taken minutes apart can be compared.

Batch-1 timings on a small shared machine vary from run to run, far more when another process competes, and the
machine has phases of slow-down (benchmarks/RESULTS.md). So a measurement here: pins intra-op threads (inter-op 1,
sequential execution, all graph optimisations), warms up >= 30 runs, takes the median and p90 of >= 200 timed
runs (perf_counter_ns) in each of >= 3 repetitions, and reports the spread of the per-repetition medians. A fixed
reference model (the uncompressed base) is timed interleaved with the candidate, alternating which goes first,
in short alternating blocks, so drift shows up in the reference and `rel` (candidate / reference, median of
per-repetition ratios) survives it. What the reference cannot cancel: int8 kernels drift against the fp32 reference
with the machine's phases: a policy with int8 units timed twice in a row agrees more closely than timed again minutes
later (benchmarks/eval_latency.py), which bounds how well any prediction made earlier can do.

Timing never runs beside torch work. `MachineLock` is a readers-writer lock on two files (fcntl.flock, so it works
across processes, Ray actors included): torch work (apply, recovery, accuracy, export) holds it *shared*; timing
holds it *exclusive*, so a timed run starts only when no torch work is in flight on the machine and none starts
until it ends. A "gate" file gives the writer priority: a waiting timer holds the gate, so new torch work queues
behind it instead of starving it. Every evaluator process of one user on one machine uses the same lock files (in a
private directory of that user's under the temp dir, or under $SQUEEZER_LOCK_DIR), and so does the search driver
around its sampler and storage work. On a remote timing device (a Ray node with a custom resource) nothing else
runs, and the same lock is simply uncontended.

`LatencyTable` predicts a candidate's latency from per-(unit, choice) deltas measured once per hardware and cached
on disk: a measured model has only that unit's choice applied (so a pruned group's consumers are included), timed
interleaved with the reference, stored as a relative delta and predicted as base x (1 + sum of deltas). A unit's
choice is split into parts that are timed separately and summed (prune, rank, block, and the bit widths together,
since int8 kernels need both weights and activations quantized), so the table is finite and can be built up front,
with progress, instead of one entry per combination of knobs. Sums of per-unit deltas are biased where units
interact (int8 units share the quantize/dequantize steps between them, benchmarks/latency_additivity.py), so the
table also times a few whole random policies (a third of them float only, a third with a few int8 units) and
corrects the sums by what they measured (`fit_slopes`): pruning two coupled groups saves less than the sum of
their savings alone (a convolution's MACs are the product of its kept input and output channels), so the fit also
weighs the policy's MAC change, computed from shapes; in "hybrid" mode every timed candidate adds a point to that
fit, as does every candidate a repaired search times. A bit-width delta is timed on the unit's rank
or block and scaled by the share of that form's MACs that pruning leaves, so pruning that reaches an int8 unit is
counted there and not again among the structural deltas (`sums`).
"""
from __future__ import annotations

import contextlib
import errno
import fcntl
import functools
import hashlib
import itertools
import json
import os
import platform
import random
import stat
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np

from squeezer.policies.policy import LayerChoice, Policy
from squeezer.spaces.knobs import BITS, CHANNELS, FORM, KNOBS, param_key, split_key

__all__ = ["LatencyResult", "LatencyMeter", "LatencyTable", "choice_parts", "table_entries", "MachineLock",
           "calibration_policies", "fit_slopes", "nonneg_lstsq", "hardware_fingerprint", "make_session",
           "time_session", "timing_threads"]


def timing_threads(threads: int | None = None) -> int:
    """`threads`, or by default every core but one: the search's driver and the system keep running while a
    candidate is timed, and on this 2-core VM timing on both cores put the same model's medians 16% apart (1.2%
    on one; benchmarks/eval_latency.py --threads 2 vs 1)."""
    return int(threads) if threads else max(1, (os.cpu_count() or 1) - 1)


DEFAULT_PROVIDERS = ["CPUExecutionProvider"]


def hardware_fingerprint(threads: int | None = None, providers: list[str] | None = None) -> dict[str, Any]:
    """What a latency number depends on: CPU model, cores, threads used, onnxruntime version and the execution
    providers the timing sessions run on (not merely those installed), torch version."""
    import onnxruntime as ort
    import torch

    cpu = platform.processor() or platform.machine()
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    cores = os.cpu_count() or 1
    return {"cpu": cpu, "logical_cores": cores, "threads": timing_threads(threads), "onnxruntime": ort.__version__,
            "providers": list(providers or DEFAULT_PROVIDERS), "torch": torch.__version__}


def fingerprint_hash(hardware: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(hardware, sort_keys=True).encode()).hexdigest()[:12]


# ---- the machine-wide readers-writer lock ---------------------------------------------------------------------------
class MachineLock:
    """Shared for torch work, exclusive for timing, across every process of this user on this machine (see module
    docstring).

    The lock files live in a directory of this user's own (`lock_dir`), opened without following links: in a
    shared temp dir, another user could otherwise plant a link there that makes us create or lock a file of theirs.
    Not re-entrant: each use opens its own file, so code holding `compute()` that asks for `timing()` waits forever.
    """

    def __init__(self, directory: str | Path | None = None) -> None:
        root = lock_dir(Path(directory or os.environ.get("SQUEEZER_LOCK_DIR") or tempfile.gettempdir()))
        self.gate = root / "squeezer-timing.gate"
        self.rw = root / "squeezer-timing.lock"

    @contextlib.contextmanager
    def compute(self) -> Iterator[None]:
        """Held around torch work: waits while a timing run holds or waits for the machine."""
        with _opened(self.gate) as gate:
            fcntl.flock(gate, fcntl.LOCK_EX)
            rw = _open(self.rw)
            fcntl.flock(rw, fcntl.LOCK_SH)
            fcntl.flock(gate, fcntl.LOCK_UN)
        try:
            yield
        finally:
            fcntl.flock(rw, fcntl.LOCK_UN)
            os.close(rw)

    @contextlib.contextmanager
    def timing(self) -> Iterator[None]:
        """Held around a timing run: waits for in-flight torch work to finish and keeps new work out."""
        with _opened(self.gate) as gate, _opened(self.rw) as rw:
            fcntl.flock(gate, fcntl.LOCK_EX)
            fcntl.flock(rw, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(rw, fcntl.LOCK_UN)
                fcntl.flock(gate, fcntl.LOCK_UN)


def lock_dir(root: Path) -> Path:
    """This user's lock directory under `root`, made private (0o700); refused unless it is a real directory that
    this user owns, since whoever owns it could swap the lock files."""
    path = root / f"squeezer-{os.getuid()}"
    root.mkdir(parents=True, exist_ok=True)
    with contextlib.suppress(FileExistsError):
        os.mkdir(path, 0o700)
    info = os.lstat(path)
    if not stat.S_ISDIR(info.st_mode) or info.st_uid != os.getuid():
        kind = "a link" if stat.S_ISLNK(info.st_mode) else "not a directory" if not stat.S_ISDIR(info.st_mode) \
            else f"owned by user {info.st_uid}"
        raise FileExistsError(f"lock directory {str(path)!r} is {kind}, not this user's own: remove it, or set "
                              "SQUEEZER_LOCK_DIR to a directory of yours")
    if info.st_mode & 0o077:
        os.chmod(path, 0o700)
    return path


def _open(path: Path) -> int:
    """A lock file's descriptor; a link in its place is refused rather than followed."""
    try:
        return os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise FileExistsError(f"lock file {str(path)!r} is a link: remove it") from None
        raise


@contextlib.contextmanager
def _opened(path: Path) -> Iterator[int]:
    fd = _open(path)
    try:
        yield fd
    finally:
        os.close(fd)


# ---- timing ----------------------------------------------------------------------------------------------------------
def make_session(onnx_model: bytes, threads: int, providers: list[str] | None = None) -> Any:
    """An onnxruntime session with pinned threads: intra-op `threads`, inter-op 1, sequential, all optimisations."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = int(threads)
    opts.inter_op_num_threads = 1
    opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    opts.log_severity_level = 3
    return ort.InferenceSession(onnx_model, opts, providers=providers or DEFAULT_PROVIDERS)


def time_session(session: Any, feed: dict[str, np.ndarray], runs: int, warmup: int = 0) -> np.ndarray:
    """Wall time of each of `runs` runs in ms (after `warmup` untimed runs)."""
    for _ in range(warmup):
        session.run(None, feed)
    out = np.empty(runs, dtype=np.float64)
    for i in range(runs):
        start = time.perf_counter_ns()
        session.run(None, feed)
        out[i] = time.perf_counter_ns() - start
    return out / 1e6


@dataclass(frozen=True)
class LatencyResult:
    """median/p90 in ms over all timed runs; spread = (max - min) / median of the per-repetition medians;
    rel = median of per-repetition candidate/reference ratios; ref_ms/ref_spread show the reference's drift."""

    median_ms: float
    p90_ms: float
    spread: float
    rel: float
    ref_ms: float
    ref_spread: float


def _spread(medians: list[float]) -> float:
    return float((max(medians) - min(medians)) / max(1e-12, float(np.median(medians))))


BLOCKS = 8  # each repetition alternates reference and candidate in this many blocks of runs


METER_VERSION = 2  # how LatencyMeter times; a table timed by an earlier meter is timed again (see its docstring)
MIN_RUNS = 200  # timed runs of each model in one measurement, over all its repetitions
MIN_REPS = 3


class LatencyMeter:
    """Times candidates against a fixed reference model, interleaved, under the machine lock.

    How fast an onnxruntime session runs is settled when it is made: sessions of one model differ by far more than
    one session's timings do (benchmarks/latency_noise.py). So every repetition times both models in sessions made
    for it, and the relative latency is a median over those pairs: one reference session kept for the meter's life
    would shift everything the meter timed by how fast it happened to run. `runs` is per repetition, at least
    MIN_RUNS in all: more repetitions of fewer runs each buy precision for the cost of making their sessions."""

    def __init__(self, reference: bytes, input_shape: tuple[int, ...], *, batch: int = 1, threads: int | None = None,
                 warmup: int = 30, runs: int = 200, reps: int = 3, lock: MachineLock | None = None,
                 providers: list[str] | None = None) -> None:
        self.threads = timing_threads(threads)
        self.batch, self.warmup, self.reps = batch, max(30, warmup), max(MIN_REPS, reps)
        self.runs = max(runs, -(-MIN_RUNS // self.reps))
        self.providers = providers
        self.lock = lock or MachineLock()
        shape = (batch, *tuple(input_shape)[1:])
        self.input = np.random.default_rng(0).standard_normal(shape).astype(np.float32)
        self.reference = reference

    def hardware(self) -> dict[str, Any]:
        return hardware_fingerprint(self.threads, self.providers)

    def measure(self, candidate: bytes) -> LatencyResult:
        """Time `candidate` and the reference in alternating repetitions (holding the lock exclusively)."""
        references: list[Any] = []
        sessions: list[Any] = []
        for rep in range(self.reps):  # made in turns (ABBA): a session made later tended to run faster
            pair = ((references, self.reference), (sessions, candidate))
            for sink, model in (pair if rep % 2 == 0 else pair[::-1]):
                sink.append(make_session(model, self.threads, self.providers))
        feed = {sessions[0].get_inputs()[0].name: self.input}
        ref_feed = {references[0].get_inputs()[0].name: self.input}
        block = max(1, self.runs // BLOCKS)
        cand: list[list[np.ndarray]] = [[] for _ in range(self.reps)]
        ref: list[list[np.ndarray]] = [[] for _ in range(self.reps)]
        with self.lock.timing():
            for rep, (reference, session) in enumerate(zip(references, sessions)):
                time_session(reference, ref_feed, 0, self.warmup)
                time_session(session, feed, 0, self.warmup)
                for i in range(-(-self.runs // block)):  # alternate short blocks so both see the same drift
                    order = ((reference, ref_feed, ref), (session, feed, cand))
                    for sess, fd, sink in (order if (rep + i) % 2 == 0 else order[::-1]):
                        sink[rep].append(time_session(sess, fd, block, 1))
        c_runs = [np.concatenate(c) for c in cand]
        r_runs = [np.concatenate(r) for r in ref]
        c_med = [float(np.median(c)) for c in c_runs]
        r_med = [float(np.median(r)) for r in r_runs]
        all_c = np.concatenate(c_runs)
        return LatencyResult(median_ms=float(np.median(all_c)), p90_ms=float(np.percentile(all_c, 90)),
                             spread=_spread(c_med), rel=float(np.median([c / r for c, r in zip(c_med, r_med)])),
                             ref_ms=float(np.median(np.concatenate(r_runs))), ref_spread=_spread(r_med))


# ---- lookup table ----------------------------------------------------------------------------------------------------
INT8 = 8  # every bit width up to 8 is exported as int8 (policies/quantize.py)


@functools.lru_cache(maxsize=4096)  # a search's repair asks for the same few choices thousands of times
def _parts(choice: LayerChoice) -> tuple[LayerChoice, ...]:
    return tuple(choice_parts(choice))


def choice_parts(choice: LayerChoice) -> list[LayerChoice]:
    """A unit's choice as the parts the table times separately: each structural knob (prune, rank, block) alone,
    and the bit widths together (the knobs' roles in the registry).

    Bit widths are timed in their int8 form: the export stores every width up to 8 bits as int8
    (policies/quantize.py), so w4 and w8 run the same kernels and one entry serves both. They are timed on the
    unit's form (its rank or block, unpruned): a decomposed or depthwise-separable unit quantizes two or three
    convolutions, and an int8 depthwise one can cost more than the whole float unit did.
    """
    changed = choice.changed()
    parts = [LayerChoice(**{k: v}) for k, v in changed.items() if KNOBS[k].role != BITS]
    bits = {k: (INT8 if v <= INT8 else KNOBS[k].neutral) for k, v in changed.items() if KNOBS[k].role == BITS}
    if bits:
        parts.append(LayerChoice(**bits, **_form(changed)))
    return parts


def _with_role(role: str) -> list[str]:
    return [k for k, knob in KNOBS.items() if knob.role == role]


def _form(changed: dict[str, Any]) -> dict[str, Any]:
    """The structural form a unit's bit widths are timed on: its rank or block, not its pruning."""
    return {k: v for k, v in changed.items() if KNOBS[k].role == FORM}


def table_entries(space: Any) -> list[tuple[str, LayerChoice]]:
    """Every distinct (unit, part) a policy of `space` can contain: each prune/rank/block choice, and each int8
    form on each rank and block."""
    entries: list[tuple[str, LayerChoice]] = []
    bits = _with_role(BITS)
    for unit in space.units:
        forms = [LayerChoice(**{knob: v}) for knob in KNOBS if KNOBS[knob].role != BITS
                 for v in space.choices(unit, knob)]
        shapes = [{}] + [f.changed() for f in forms if _form(f.changed())]
        widths = list(itertools.product(*(space.choices(unit, k) or (KNOBS[k].neutral,) for k in bits)))
        forms += [LayerChoice(**dict(zip(bits, combo)), **shape) for shape in shapes for combo in widths]
        entries += [(unit, part) for part in dict.fromkeys(p for form in forms for p in choice_parts(form))]
    return entries


def calibration_policies(space: Any, n: int, seed: int = 0) -> list[Policy]:
    """`n` random policies of `space`, from barely to heavily changed (each changes a random share of its knobs), of
    three kinds in turn: any knob drawn, bit widths left alone, and bit widths drawn on only one to four units.

    Why the kinds: random bit widths make nearly every policy int8-heavy (most of a unit's widths are int8 forms),
    and a fit to those alone mispredicts pruned float models. A few int8 units in a pruned float model is what repair
    makes of a latency limit, and there int8 costs what its unscaled deltas say: quantize steps around each int8
    unit, whatever its MACs, far more than the MAC-scaled deltas predict (benchmarks/RESULTS.md).
    """
    rng = random.Random(seed)
    dists = space.distributions()
    bits_units = sorted({split_key(k)[0] for k in dists if _is_bits_knob(k)})
    out = []
    for i in range(n):
        share = rng.random()
        kind = i % 3  # 0: any knob, 1: float only, 2: a few int8 units
        few = set(rng.sample(bits_units, min(len(bits_units), rng.randint(1, 4)))) if kind == 2 else set()
        params = {}
        for k, c in dists.items():
            if _is_bits_knob(k) and kind:
                params[k] = rng.choice(c[1:]) if split_key(k)[0] in few and rng.random() < 0.5 else c[0]
            else:
                params[k] = rng.choice(c) if rng.random() < share else c[0]
        if kind == 2 and not any(params[k] != dists[k][0] for k in dists if _is_bits_knob(k)):
            for unit in few:  # at least one unit's weights in int8
                key = next(param_key(unit, k) for k in _with_role(BITS) if param_key(unit, k) in dists)
                params[key] = dists[key][1]
        out.append(Policy.from_params(params, space))
    return out


def _is_bits_knob(key: str) -> bool:
    return KNOBS[split_key(key)[1]].role == BITS


MIN_POINTS = 4  # whole policies timed before the sums are corrected
FIT_WINDOW = 16  # the latest timed whole policies the correction is fitted to
SUMS_VERSION = 5  # how `LatencyTable.sums` adds deltas; calibration points summed another way are timed again
UNCORRECTED = (1.0, 0.0, 1.0, 0.0)  # the slopes before there are MIN_POINTS: the structural and scaled bits sums


def _touched_units(space: Any) -> dict[str, set[str]]:
    """Unit -> every unit reading or writing the channels its output group holds (what pruning that group changes)."""
    members: dict[str, set[str]] = {}
    for name, unit in space.units.items():
        members.setdefault(unit.out_group, set()).add(name)
        for group in {unit.in_group, *(g for g, _ in unit.in_parts)} - {None}:
            members.setdefault(group, set()).add(name)
    return {name: members.get(unit.out_group, {name}) for name, unit in space.units.items()}


def fit_slopes(points: list[list[float]]) -> tuple[float, float, float, float]:
    """Least-squares slopes (a, m, b, c) >= 0 of measured = 1 + a x parts + m x macs + b x bits + c x bits_unscaled
    over timed whole policies ([parts, bits, bits_unscaled, macs, measured] each: `LatencyTable.sums` and the
    timing); UNCORRECTED until there are MIN_POINTS.

    Why these four. The structural deltas, each timed alone, over-count what units save together: a convolution
    between two pruned groups keeps (1 - r_in)(1 - r_out) of its MACs, not 1 - r_in - r_out. The MAC change, from
    shapes, knows the product, and the fit weighs it against the timed deltas, which know what MACs do not (a form's
    extra operators, a small input's per-operator overhead). The bit widths need two slopes: int8 costs partly per
    MAC (int8-heavy policies follow the scaled sum) and partly per quantize step around an int8 unit, whatever its
    MACs (a few int8 units in a pruned float model follow the unscaled one). How well this predicts held-out
    policies is measured by benchmarks/latency_fit.py (benchmarks/RESULTS.md)."""
    if len(points) < MIN_POINTS:
        return UNCORRECTED
    x = np.array([[p[0], p[3], p[1], p[2]] for p in points], dtype=float)
    y = np.array([p[4] - 1.0 for p in points], dtype=float)
    a, m, b, c = nonneg_lstsq(x, y)
    return float(a), float(m), float(b), float(c)


def nonneg_lstsq(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Least-squares coefficients of y ~ x, each >= 0 (all 0 where no fit beats that): scipy's NNLS."""
    from scipy.optimize import nnls

    coef, _ = nnls(np.asarray(x, dtype=float), np.asarray(y, dtype=float))
    return coef


def is_bits(part: LayerChoice) -> bool:
    return any(KNOBS[k].role == BITS for k in part.changed())


def _prunes(part: LayerChoice) -> bool:
    return any(KNOBS[k].role == CHANNELS for k in part.changed())


Progress = Callable[[int, int], None]


class LatencyTable:
    """Per-(unit, choice part) relative latency deltas, measured once per hardware and cached as JSON.

    `build(policy) -> onnx bytes` makes the model with one unit's part applied; `key` names the model and input
    (e.g. space fingerprint + batch) so tables of different models never mix. `fill` measures every entry a space
    can need up front; an entry still missing when predicting is measured then.
    """

    def __init__(self, meter: LatencyMeter, build: Callable[[Policy], bytes], *, key: str, fingerprint: str = "",
                 cache_dir: str | Path | None = None, space: Any = None) -> None:
        self.meter, self.build, self.fingerprint, self.space = meter, build, fingerprint, space
        self._macs: dict[tuple[str, tuple], int] = {}  # (unit, form) -> its unpruned MACs
        hw = meter.hardware()
        name = f"lut-{fingerprint_hash(hw)}-{key}-b{meter.batch}-m{METER_VERSION}-r{meter.reps}.json"
        self.path = Path(cache_dir) / name if cache_dir else None
        self.data: dict[str, Any] = {"hardware": hw, "base_us": None, "deltas": {}, "calibration": [],
                                     "sums": SUMS_VERSION}
        self._touches = _touched_units(space) if space is not None else {}
        self._fitted: tuple[int, tuple[float, float, float, float]] | None = None  # (points fitted on, slopes)
        self._base_macs = (space.baseline().macs or 1) if space is not None else 1  # the units' MACs, unchanged
        self._load()

    def _load(self) -> None:
        """Merge what is on disk (another worker may have measured entries since)."""
        if self.path is not None and self.path.is_file():
            with contextlib.suppress(ValueError, OSError):
                disk = json.loads(self.path.read_text())
                self.data["deltas"] = {**disk.get("deltas", {}), **self.data["deltas"]}
                # [parts, bits, bits unscaled, macs, measured]; points summed another way (older tables) are timed
                # again
                points = (disk.get("calibration", []) if disk.get("sums") == SUMS_VERSION else [])
                points += self.data["calibration"]
                self.data["calibration"] = [list(p) for p in dict.fromkeys(map(tuple, points)) if len(p) == 5]
                if self.data.get("base_us") is None:
                    self.data["base_us"] = disk.get("base_us")

    def refresh(self) -> None:
        """Take in what others saved to the table's file since: a worker's copy reads the timings its search's
        driver recorded, so its predictions are corrected as the driver's are."""
        self._load()

    @staticmethod
    @functools.lru_cache(maxsize=65536)
    def entry_key(unit: str, part: LayerChoice) -> str:
        return f"{unit}|{json.dumps(part.changed(), sort_keys=True)}"

    def _save(self) -> None:
        if self.path is not None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            tmp = self.path.with_suffix(f".{os.getpid()}.tmp")
            tmp.write_text(json.dumps(self.data, indent=1, sort_keys=True))
            tmp.replace(self.path)

    def base_us(self) -> float:
        if self.data.get("base_us") is None:
            result = self.meter.measure(self.build(Policy(fingerprint=self.fingerprint)))
            self.data["base_us"] = result.ref_ms * 1e3
            self._save()
        return float(self.data["base_us"])

    def delta(self, unit: str, part: LayerChoice) -> float:
        """Relative latency change of applying `part` to `unit` alone (measured once, then from the table)."""
        key = self.entry_key(unit, part)
        if key not in self.data["deltas"]:
            self._load()
        if key not in self.data["deltas"]:
            policy = Policy(layers={unit: part}, fingerprint=self.fingerprint)
            self.data["deltas"][key] = self.meter.measure(self.build(policy)).rel - 1.0
            self._save()
        return float(self.data["deltas"][key])

    def missing(self, entries: list[tuple[str, LayerChoice]]) -> list[tuple[str, LayerChoice]]:
        self._load()
        return [(u, p) for u, p in entries if self.entry_key(u, p) not in self.data["deltas"]]

    def fill(self, entries: list[tuple[str, LayerChoice]], progress: Progress | None = None,
             calibration: list[Policy] = ()) -> int:
        """Measure the base, every entry not yet in the table, and the `calibration` policies (when the table holds
        fewer points than given); `progress(done, total)` after each. Returns how many models were timed (a killed
        build keeps what it timed: each result is saved as it lands)."""
        todo = self.missing(entries)
        policies = list(calibration)[len(self.data["calibration"]):]
        steps = ([self.base_us] if self.data.get("base_us") is None else [])
        steps += [lambda u=u, p=p: self.delta(u, p) for u, p in todo]
        steps += [lambda p=p: self.record(p, self.meter.measure(self.build(p)).rel) for p in policies]
        if progress:
            progress(0, len(steps))
        for done, step in enumerate(steps, 1):
            step()
            if progress:
                progress(done, len(steps))
        return len(steps)

    def sums(self, policy: Policy) -> tuple[float, float, float, float]:
        """(structural, bit-width, unscaled bit-width) sums of the policy's per-unit deltas, and its units' MAC
        change relative to the unchanged model's (from shapes; 0 without a space).

        A bit-width part counts what int8 adds to the unit's form (its rank or block: the two were timed together),
        and with a space it is also summed scaled by the share of that form's MACs the pruning leaves. A pruned
        group whose layers include an int8 one is left out of the structural sum: what it saves there is already
        in that scaled bit-width delta, and counted twice it made pruned int8 models look far too fast."""
        costs: dict[str, tuple[int, int]] = {}
        int8: set[str] = set()
        macs = 0.0
        if self.space is not None:
            costs = self.space.unit_costs(policy.layers)
            int8 = {u for u, c in policy.layers.items() if any(is_bits(p) for p in _parts(c))}
            macs = sum(m for m, _ in costs.values()) / self._base_macs - 1.0
        parts = bits = unscaled = 0.0
        for unit, choice in sorted(policy.layers.items()):
            for part in _parts(choice):
                if is_bits(part):
                    form = _form(part.changed())
                    extra = self.delta(unit, part) - (self.delta(unit, LayerChoice(**form)) if form else 0.0)
                    share = costs[unit][0] / max(1, self._form_macs(unit, form)) if costs else 1.0
                    bits += extra * share
                    unscaled += extra
                elif not (_prunes(part) and self._touches.get(unit, {unit}) & int8):
                    parts += self.delta(unit, part)
        return parts, bits, unscaled, macs

    def _form_macs(self, unit: str, form: dict[str, Any]) -> int:
        """MACs of `unit` in `form` (its rank or block) with nothing pruned: what a bit-width delta was timed on."""
        key = (unit, tuple(sorted(form.items())))
        if key not in self._macs:
            self._macs[key] = self.space.unit_costs({unit: LayerChoice(**form)} if form else {})[unit][0]
        return self._macs[key]

    def record(self, policy: Policy, measured_rel: float) -> None:
        """Add a timed whole policy to the points the sums' correction is fitted to."""
        self.data["calibration"].append([*self.sums(policy), float(measured_rel)])
        self._save()

    def slopes(self) -> tuple[float, float, float, float]:
        """`fit_slopes` of the FIT_WINDOW latest timed whole policies (refitted when points are added).

        Latest, because a search's own timed candidates (handed back by `record`) are the policies it will ask
        about next, and the machine drifts: in a repaired latency search on digits the fit to the latest 16 points
        predicted each next candidate within 13.3% (median), the fit to all of them within 20.7%."""
        points = self.data["calibration"]
        if self._fitted is None or self._fitted[0] != len(points):
            self._fitted = (len(points), fit_slopes(points[-FIT_WINDOW:]))
        return self._fitted[1]

    def predict_rel(self, policy: Policy) -> float:
        """Predicted latency relative to the base model (floored at 5% of it): 1 + the fitted slopes times the
        structural sum, the MAC change and the bit-width sums, scaled and unscaled."""
        parts, bits, unscaled, macs = self.sums(policy)
        a, m, b, c = self.slopes()
        return max(0.05, 1.0 + a * parts + m * macs + b * bits + c * unscaled)

    def predict_us(self, policy: Policy) -> float:
        """Predicted latency in microseconds: base latency x `predict_rel` (the corrected sum of deltas)."""
        return self.base_us() * self.predict_rel(policy)

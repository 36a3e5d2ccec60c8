"""``profile``: parameters, FLOPs, latency/FPS, peak memory and efficiency of one model forward
(and, with ``train=True``, of one training step).

What one call of :func:`profile` measures, on random inputs (B, 3, size, size) and C classes:

- parameters, total and trainable (``requires_grad``), in millions;
- GFLOPs of one forward from ``torch.utils.flop_counter.FlopCounterMode``: torch's formulas for
  its ops, the ovseg-fast ops through the formulas they register (``<op>_flops``), and CPU
  attention (``aten._scaled_dot_product_flash_attention_for_cpu``, which torch's counter leaves
  at 0) through torch's own SDPA formula registered here; broken down per module to ``depth`` and
  per op;
- latency: the median of timed forwards after warm-up, and FPS = B / latency;
- peak memory: the rise of the process's peak resident set during one forward (the benchmarks'
  measure, :func:`ovseg_fast.bench._common.peak_memory_bytes`; None where /proc is missing);
- efficiency: achieved GFLOP/s over the dense-GEMM rate of this machine, a float32 ``torch.mm``
  of the shape of the model's largest GEMM;
- ``compare="reference"``: the same forward with every ovseg-fast op on its plain-PyTorch
  reference (``use_backend("reference")``), and ovseg-fast's speed-up over it.

The forward, the GEMM and the reference forward are timed in turn, round after round, so that on a
shared machine all three see the same load (timed one after the other, a 2-core VM under other
jobs gave an "efficiency" of 104%); their ratios are what to read, the absolute times vary.

``dtype=torch.bfloat16`` runs the forward under CPU autocast (the ops run their bfloat16 kernels).

``train=True`` also measures one training step in training mode: the model's
:meth:`~ovseg_fast.models.Segmentor.example_training_step` on random targets (label maps; PixelCLIP:
random masks), the backward of the summed losses, an AdamW step over the trainable parameters and
what follows it (PixelCLIP's teacher EMA): its GFLOPs (forward + backward as torch's counter and the
ops' formulas count them; the optimiser's element-wise work is left out), median time, images per
second and efficiency, and with ``compare="reference"`` the same step on the reference backend. The
step updates the weights, so a module passed in is copied first (a model built here by name is not).

The class embeddings are not part of the measured forward: a deployed model encodes its class
names once and caches them (ZegCLIP loads them from a file). A :class:`~ovseg_fast.models.Segmentor`
gets random unit vectors of its text dimension (found by encoding one class name once), any other
module gets the list of class names.

:data:`ZEGCLIP` is the paper's own row (VOC 512x512), printed beside ours for scale and marked as
quoted. It was measured on a GPU, its parameters are the trainable ones (CLIP is frozen), and its
GFLOPs most likely come from mmcv's counter (ZegCLIP is an mmsegmentation 0.x project, whose
``tools/get_flops.py`` uses it), which counts a multiply-add as one FLOP where ours counts two.
"""

from __future__ import annotations

import copy
import dataclasses
import math
import statistics
import time
from collections.abc import Sequence
from typing import Any, Callable, Optional, Union

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.flop_counter import FlopCounterMode, flop_registry, register_flop_formula, sdpa_flop

from ovseg_fast.models.base import Segmentor, TrainingStep, _resize
from ovseg_fast.models.losses import cross_entropy
from ovseg_fast.ops._checks import check_choice, check_float, check_int

__all__ = ["ZEGCLIP", "ProfileResult", "QuotedRow", "TrainStepResult", "format_profile", "profile"]

_aten = torch.ops.aten


# torch's counter has SDPA formulas for the CUDA kernels only; on CPU SDPA runs this op and would
# count 0 FLOPs. Same formula (the two attention GEMMs), guarded: registering twice is an error.
# ``sdpa_flop`` as torch exports it already converts tensors to shapes, hence get_raw.
def _register_cpu_attention_flops() -> None:
    op = _aten._scaled_dot_product_flash_attention_for_cpu
    if op not in flop_registry:
        register_flop_formula(op, get_raw=True)(sdpa_flop)


_register_cpu_attention_flops()


@dataclasses.dataclass(frozen=True)
class QuotedRow:
    """A published measurement, printed beside ours and marked as quoted (not measured here).
    ``params_m`` are trainable parameters when ``trainable_only``; ``note`` says how to compare."""

    name: str
    setting: str
    params_m: float
    gflops: float
    fps: float
    hardware: str
    source: str
    trainable_only: bool = False
    note: str = ""


#: ZegCLIP (Zhou et al., CVPR 2023), its efficiency table, VOC at 512x512: 13.8 M (trainable)
#: parameters, 110.4 GFLOPs, 9.0 FPS on an NVIDIA 1080Ti.
ZEGCLIP = QuotedRow(
    name="ZegCLIP",
    setting="VOC 512x512",
    params_m=13.8,
    gflops=110.4,
    fps=9.0,
    hardware="GTX 1080Ti",
    source="ZegCLIP paper (CVPR 2023)",
    trainable_only=True,
    note="its GFLOPs most likely count a multiply-add as 1 FLOP (mmcv's counter), ours as 2: compare "
    "with half of our GFLOPs; its FPS is a GPU's",
)


@dataclasses.dataclass
class TrainStepResult:
    """One training step (forward, losses, backward, optimiser step) of the whole batch."""

    gflops: float
    step_ms: float
    timed_runs: int
    images_per_s: float
    achieved_gflops_per_s: float
    efficiency: float  #: over the same GEMM rate as the forward's
    losses: tuple[str, ...]
    reference_step_ms: Optional[float] = None
    speedup: Optional[float] = None


@dataclasses.dataclass
class ProfileResult:
    """One model at one input size and dtype. GFLOPs count one forward of the whole batch
    (multiply-add = 2 FLOPs); times are medians; ``None`` marks what was not measured."""

    model: str
    size: tuple[int, int]
    classes: int
    batch: int
    dtype: str
    threads: int
    params_m: float
    trainable_params_m: float
    gflops: float
    module_gflops: list[tuple[str, float]]
    op_gflops: dict[str, float]
    custom_op_calls: dict[str, int]
    latency_ms: float
    timed_runs: int
    fps: float
    peak_memory_mib: Optional[float]
    achieved_gflops_per_s: float
    gemm_shape: tuple[int, int, int]
    gemm_gflops_per_s: float
    efficiency: float
    reference_latency_ms: Optional[float] = None
    speedup: Optional[float] = None
    train: Optional[TrainStepResult] = None  #: one training step, when profiled with ``train=True``
    quoted: tuple[QuotedRow, ...] = (ZEGCLIP,)
    params: Optional[int] = None  #: exact counts (papers quote trainable counts to the unit)
    trainable_params: Optional[int] = None

    def to_dict(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        out["module_gflops"] = [list(row) for row in self.module_gflops]
        return out


class _CallRecorder(TorchDispatchMode):
    """Records the largest dense GEMM (by FLOPs) and the ovseg-fast ops a forward calls."""

    _GEMMS = (_aten.mm.default, _aten.addmm.default, _aten.bmm.default, _aten.baddbmm.default)

    def __init__(self) -> None:
        super().__init__()
        self.gemm: tuple[int, int, int] = (0, 0, 0)
        self.custom_calls: dict[str, int] = {}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in self._GEMMS:
            a, b = (args[1], args[2]) if func in (_aten.addmm.default, _aten.baddbmm.default) else args[:2]
            m, k, n = a.shape[-2], a.shape[-1], b.shape[-1]
            if a.dim() == 3:
                m *= a.shape[0]  # a batched GEMM as one of the same FLOPs, as a dense mm would run it
            if m * k * n > math.prod(self.gemm):
                self.gemm = (int(m), int(k), int(n))
        elif func.namespace == "ovseg_fast":
            name = func.name().split("::")[-1].split(".")[0]
            self.custom_calls[name] = self.custom_calls.get(name, 0) + 1
        return func(*args, **kwargs)


def _interleaved_medians(
    fns: Sequence[Callable[[], object]], *, warmup: int, min_runs: int, min_seconds: float
) -> tuple[list[float], int]:
    """Median seconds of each of ``fns``, called in turn each round (so that all of them see the
    same load on a shared machine), for at least ``min_runs`` rounds and ``min_seconds`` in all."""
    for fn in fns:
        for _ in range(warmup):
            fn()
    times: list[list[float]] = [[] for _ in fns]
    start = time.perf_counter()
    rounds = 0
    while rounds < min_runs or (time.perf_counter() - start < min_seconds and rounds < 1000):
        for fn, acc in zip(fns, times):
            t0 = time.perf_counter()
            fn()
            acc.append(time.perf_counter() - t0)
        rounds += 1
    return [statistics.median(t) for t in times], rounds


def _gemm(shape: tuple[int, int, int]) -> Callable[[], Tensor]:
    """A float32 ``torch.mm`` of (m, k) x (k, n) on fresh random matrices."""
    m, k, n = shape
    gen = torch.Generator().manual_seed(0)
    a, b = torch.randn(m, k, generator=gen), torch.randn(k, n, generator=gen)
    return lambda: torch.mm(a, b)


def _op_name(op: object) -> str:
    return str(op).replace("aten.", "")


def _module_rows(counts: dict[str, dict[Any, int]], depth: int) -> list[tuple[str, float]]:
    """(name, GFLOPs) of the module tree to ``depth`` levels, depth first, children by FLOPs.

    The counter records every module *called*, under its full path; modules a model reaches
    through methods rather than calls (e.g. CLIP blocks run by hand) appear only through their
    called descendants. Each recorded module's own FLOPs (its total less its recorded descendants')
    are summed up the path, and chains with no own FLOPs and one child are merged into one row
    (``backbone.clip.visual``), so ``depth`` counts the levels that split the work; the first row is
    the model itself. A module with
    both own FLOPs and children gets a ``(own ops)`` row.
    """
    totals = {name: sum(ops.values()) for name, ops in counts.items() if name != "Global"}
    own = dict(totals)
    for name, flops in totals.items():
        parts = name.split(".")
        for cut in range(len(parts) - 1, 0, -1):  # the nearest recorded ancestor
            parent = ".".join(parts[:cut])
            if parent in totals:
                own[parent] -= flops
                break
    tree: dict[tuple[str, ...], dict] = {}
    for name, flops in own.items():
        node = tree
        for part in name.split("."):
            node = node.setdefault((part,), {})
        node[("",)] = node.get(("",), 0) + flops  # ("",) holds a node's own FLOPs

    def total(node: dict) -> int:
        return sum(v if k == ("",) else total(v) for k, v in node.items())

    rows: list[tuple[str, float]] = []

    def walk(key: tuple[str, ...], node: dict, level: int) -> None:
        children = {k: v for k, v in node.items() if k != ("",)}
        own_flops = node.get(("",), 0)
        while level > 1 and len(children) == 1 and not own_flops:  # merge a chain below the model
            (k, v), = children.items()
            key, node = key + k, v
            children = {k2: v2 for k2, v2 in node.items() if k2 != ("",)}
            own_flops = node.get(("",), 0)
        flops = total(node)
        if flops <= 0:
            return
        indent = "  " * (level - 1)
        rows.append((indent + ".".join(key), flops / 1e9))
        if level >= depth or not children:
            return
        if own_flops > 0:
            rows.append((indent + "  (own ops)", own_flops / 1e9))
        for k, v in sorted(children.items(), key=lambda kv: -total(kv[1])):
            walk(k, v, level + 1)

    for k, v in tree.items():
        walk(k, v, 1)
    return rows


def _default_class_names(classes: int) -> list[str]:
    return [f"class {i}" for i in range(classes)]


def _text_input(model: nn.Module, classes: int) -> object:
    """Random unit class embeddings of a Segmentor's text dimension, or the class names."""
    from ovseg_fast.models.base import TextEmbeddings

    names = _default_class_names(classes)
    if not isinstance(model, Segmentor):
        return names
    with torch.no_grad():
        dim = model.encode(names[:1]).embeddings.shape[1]
    gen = torch.Generator().manual_seed(0)
    emb = F.normalize(torch.randn(classes, dim, generator=gen), dim=-1)
    return TextEmbeddings(emb, tuple(names))


def _model_name(model: nn.Module) -> str:
    return getattr(model, "registered_name", None) or type(model).__name__


def profile(
    model: Union[str, nn.Module],
    *,
    size: Union[int, Sequence[int]] = 512,
    classes: int = 20,
    batch: int = 1,
    compare: Optional[str] = None,
    dtype: torch.dtype = torch.float32,
    depth: int = 3,
    pretrained: Optional[str] = None,
    warmup: int = 1,
    min_runs: int = 3,
    min_seconds: float = 2.0,
    memory: bool = True,
    train: bool = False,
    progress: Optional[Callable[[str], None]] = None,
    **overrides: Any,
) -> ProfileResult:
    """Profiles one forward of ``model`` on random CPU inputs; see the module docstring.

    Args:
        model: an ``nn.Module`` whose ``forward(images, text)`` takes (B, 3, H, W) images and the
            classes (every :class:`~ovseg_fast.models.Segmentor` does), or a registered model name,
            built with ``create_model(model, pretrained=pretrained, **overrides)``.
        size: input side (int) or (H, W).
        classes: number of classes C.
        batch: images per forward B.
        compare: ``None`` or ``"reference"`` (also time every ovseg-fast op on its reference).
        dtype: ``torch.float32``, or ``torch.bfloat16`` for CPU autocast.
        depth: module levels of the GFLOPs breakdown (1: the model alone, 2: its children, ...).
        pretrained: checkpoint for a model given by name (random weights when None).
        warmup: untimed forwards first (at least 1: first calls fill caches).
        min_runs, min_seconds: at least ``min_runs`` rounds and ``min_seconds`` of timing (each round
            one forward, one GEMM and, when compared, one reference forward).
        memory: measure the peak resident memory of one forward (one extra forward).
        train: also profile one training step (see the module docstring).
        progress: called with a line of text before each stage (the CLI prints it to stderr).
        overrides: model config overrides, for a model given by name.

    Returns:
        :class:`ProfileResult`.
    """
    if isinstance(model, str):
        from ovseg_fast.models.registry import create_model

        name = model
        model = create_model(name, pretrained=pretrained, **overrides)
        given = False
    elif isinstance(model, nn.Module):
        if pretrained is not None or overrides:
            raise ValueError("pretrained and config overrides apply to a model given by name, not to a module")
        name = _model_name(model)
        given = True
    else:
        raise TypeError(f"model must be a registered model name or an nn.Module, got {type(model).__name__}")
    if isinstance(size, int) and not isinstance(size, bool):
        hw = (check_int("size", size, minimum=1),) * 2
    elif isinstance(size, Sequence) and len(size) == 2:
        hw = (check_int("size[0]", size[0], minimum=1), check_int("size[1]", size[1], minimum=1))
    else:
        raise TypeError(f"size must be an int or (H, W), got {size!r}")
    check_int("classes", classes, minimum=1)
    check_int("batch", batch, minimum=1)
    check_int("depth", depth, minimum=1)
    check_int("warmup", warmup, minimum=1)
    check_int("min_runs", min_runs, minimum=1)
    check_float("min_seconds", min_seconds, minimum=0.0)
    if compare is not None:
        check_choice("compare", compare, ("reference",))
    if dtype not in (torch.float32, torch.bfloat16):
        raise ValueError(f"dtype must be torch.float32 or torch.bfloat16, got {dtype}")
    if not isinstance(train, bool):
        raise TypeError(f"train must be a bool, got {type(train).__name__}")
    say = progress or (lambda _msg: None)

    was_training = model.training
    model.eval()
    try:
        run = _Run(name, hw, classes, batch, compare, dtype, warmup, min_runs, min_seconds, say)
        result = _measure(model, run, depth, memory)
    finally:
        model.train(was_training)
    if train:
        trained = copy.deepcopy(model) if given else model
        trained.train()
        try:
            result.train = _measure_training_step(trained, run, _gemm(result.gemm_shape), result.gemm_gflops_per_s)
        finally:
            model.train(was_training)
    return result


@dataclasses.dataclass(frozen=True)
class _Run:
    """What one :func:`profile` call measures, and how long: shared by the forward and the step."""

    name: str
    hw: tuple[int, int]
    classes: int
    batch: int
    compare: Optional[str]
    dtype: torch.dtype
    warmup: int
    min_runs: int
    min_seconds: float
    say: Callable[[str], None]


def _measure(model: nn.Module, run: _Run, depth: int, memory: bool) -> ProfileResult:
    name, hw, classes, batch, compare, dtype, say = (
        run.name, run.hw, run.classes, run.batch, run.compare, run.dtype, run.say
    )
    warmup, min_runs, min_seconds = run.warmup, run.min_runs, run.min_seconds
    from ovseg_fast.backends import use_backend
    from ovseg_fast.bench._common import peak_memory_bytes

    params = sum(p.numel() for p in model.parameters())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    gen = torch.Generator().manual_seed(0)
    images = torch.randn(batch, 3, *hw, generator=gen)
    say(f"profile {name}: preparing {classes} class embeddings")
    text = _text_input(model, classes)

    def forward() -> Tensor:
        with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype == torch.bfloat16):
            return model(images, text)

    say(f"profile {name}: counting FLOPs ({batch}x3x{hw[0]}x{hw[1]}, {classes} classes, {str(dtype)[6:]})")
    recorder = _CallRecorder()
    counter = FlopCounterMode(display=False, depth=depth)
    with counter, recorder:
        forward()
    total_flops = counter.get_total_flops()
    counts = counter.get_flop_counts()
    op_gflops = {
        _op_name(op): f / 1e9 for op, f in sorted(counts.get("Global", {}).items(), key=lambda kv: -kv[1])
    }

    gemm = recorder.gemm if recorder.gemm != (0, 0, 0) else (1024, 1024, 1024)
    fns: list[Callable[[], object]] = [forward, _gemm(gemm)]
    if compare == "reference":

        def reference() -> Tensor:
            with use_backend("reference"):
                return forward()

        fns.append(reference)
    say(
        f"profile {name}: timing (warm-up {warmup}, at least {min_runs} runs and {min_seconds:g} s), interleaved "
        f"with a float32 GEMM {gemm[0]}x{gemm[1]} @ {gemm[1]}x{gemm[2]}"
        + (" and the forward on the reference backend" if compare else "")
    )
    medians, runs = _interleaved_medians(fns, warmup=warmup, min_runs=min_runs, min_seconds=min_seconds)
    latency, gemm_seconds = medians[0], medians[1]
    gemm_rate = 2 * math.prod(gemm) / gemm_seconds / 1e9
    reference_latency = speedup = None
    if compare == "reference":
        reference_latency = medians[2]
        speedup = reference_latency / latency
    peak = None
    if memory:
        say(f"profile {name}: peak memory of one forward")
        nbytes = peak_memory_bytes(forward)
        peak = None if nbytes is None else nbytes / 2**20
    achieved = total_flops / latency / 1e9
    return ProfileResult(
        model=name,
        size=hw,
        classes=classes,
        batch=batch,
        dtype=str(dtype).replace("torch.", ""),
        threads=torch.get_num_threads(),
        params_m=params / 1e6,
        trainable_params_m=trainable / 1e6,
        gflops=total_flops / 1e9,
        module_gflops=_module_rows(counts, depth),
        op_gflops=op_gflops,
        custom_op_calls=dict(recorder.custom_calls),
        latency_ms=latency * 1e3,
        timed_runs=runs,
        fps=batch / latency,
        peak_memory_mib=peak,
        achieved_gflops_per_s=achieved,
        gemm_shape=gemm,
        gemm_gflops_per_s=gemm_rate,
        efficiency=achieved / gemm_rate,
        reference_latency_ms=None if reference_latency is None else reference_latency * 1e3,
        speedup=speedup,
        params=params,
        trainable_params=trainable,
    )


def _training_step(model: nn.Module, images: Tensor, classes: int, generator: torch.Generator) -> TrainingStep:
    """A Segmentor's own example step; for another module, cross-entropy of ``model(images, names)``
    (resized to the images) against random label maps."""
    names = _default_class_names(classes)
    if isinstance(model, Segmentor):
        return model.example_training_step(images, names, generator=generator)
    b, _, h, w = images.shape
    targets = torch.randint(classes, (b, h, w), generator=generator)

    def losses() -> dict[str, Tensor]:  # Segmentor.loss's default, on a module that is not one
        return {"loss_ce": cross_entropy(_resize(model(images, names), (h, w)).float(), targets)}

    return TrainingStep(losses)


def _measure_training_step(
    model: nn.Module, run: _Run, gemm: Callable[[], Tensor], gemm_rate: float
) -> TrainStepResult:
    name, hw, batch, dtype, say = run.name, run.hw, run.batch, run.dtype, run.say
    warmup, min_runs, min_seconds = run.warmup, run.min_runs, run.min_seconds
    from ovseg_fast.backends import use_backend

    gen = torch.Generator().manual_seed(1)
    images = torch.randn(batch, 3, *hw, generator=gen)
    example = _training_step(model, images, run.classes, gen)
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise ValueError(f"{name} has no trainable parameters: there is no training step to profile")
    optimizer = torch.optim.AdamW(params, lr=1e-6)
    names: list[str] = []

    def forward_backward() -> None:
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype == torch.bfloat16):
            losses = example.losses()
        if not isinstance(losses, dict) or not losses:
            raise TypeError(f"{name}'s training step must return a non-empty dict of named losses")
        names[:] = list(losses)
        sum(losses.values()).backward()

    def step() -> None:
        optimizer.zero_grad(set_to_none=True)
        forward_backward()
        optimizer.step()
        example.after_optimizer_step()

    say(f"profile {name}: counting FLOPs of one training step")
    optimizer.zero_grad(set_to_none=True)
    counter = FlopCounterMode(display=False)
    with counter:
        forward_backward()
    flops = counter.get_total_flops()
    fns: list[Callable[[], object]] = [step, gemm]
    if run.compare == "reference":

        def reference() -> None:
            with use_backend("reference"):
                step()

        fns.append(reference)
    say(f"profile {name}: timing training steps (warm-up {warmup}, at least {min_runs} runs and {min_seconds:g} s)")
    medians, runs = _interleaved_medians(fns, warmup=warmup, min_runs=min_runs, min_seconds=min_seconds)
    seconds = medians[0]
    achieved = flops / seconds / 1e9
    reference_ms = speedup = None
    if run.compare == "reference":
        reference_ms, speedup = medians[2] * 1e3, medians[2] / seconds
    return TrainStepResult(
        gflops=flops / 1e9,
        step_ms=seconds * 1e3,
        timed_runs=runs,
        images_per_s=batch / seconds,
        achieved_gflops_per_s=achieved,
        efficiency=achieved / gemm_rate,
        losses=tuple(names),
        reference_step_ms=reference_ms,
        speedup=speedup,
    )


def _fmt(value: Optional[float], spec: str = ".1f") -> str:
    return "-" if value is None else format(value, spec)


def _ms(value: float) -> str:
    return f"{value:.0f}" if value >= 100 else f"{value:.3g}"


def format_profile(results: Union[ProfileResult, Sequence[ProfileResult]], *, breakdown: bool = True) -> str:
    """Markdown tables of one or more results (e.g. float32 and bfloat16 of the same model): one
    row each (and one for the reference backend when compared), the quoted rows, the GEMM rate the
    efficiency is relative to, and the per-module and per-op GFLOPs of the first result."""
    if isinstance(results, ProfileResult):
        results = [results]
    results = list(results)
    if not results or not all(isinstance(r, ProfileResult) for r in results):
        raise TypeError("results must be a ProfileResult or a non-empty sequence of them")
    lines = [
        "| model | input | dtype | params M (trainable) | GFLOPs | latency ms | FPS | peak MiB | GFLOP/s "
        "| efficiency |",
        "| --- | --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for r in results:
        shape = f"{r.batch}x3x{r.size[0]}x{r.size[1]}, C={r.classes}"
        lines.append(
            f"| {r.model} | {shape} | {r.dtype} | {r.params_m:.1f} ({r.trainable_params_m:.1f}) | {r.gflops:.4g} "
            f"| {_ms(r.latency_ms)} | {r.fps:.3g} | {_fmt(r.peak_memory_mib)} | {r.achieved_gflops_per_s:.1f} "
            f"| {r.efficiency:.0%} |"
        )
        if r.reference_latency_ms is not None:
            lines.append(
                f"| {r.model}, ovseg-fast ops on the reference backend | {shape} | {r.dtype} | | | "
                f"{_ms(r.reference_latency_ms)} | {r.batch / r.reference_latency_ms * 1e3:.3g} | | | "
                + (
                    f"ovseg-fast {r.speedup:.2f}x faster |"
                    if r.custom_op_calls
                    else f"{r.speedup:.2f}x: noise, no ovseg-fast op is called |"
                )
            )
    for q in results[0].quoted:
        params = f"{q.params_m:.1f} trainable" if q.trainable_only else f"{q.params_m:.1f}"
        lines.append(
            f"| {q.name} (quoted: {q.source}; {q.hardware}) | {q.setting} | | {params} | {q.gflops:.1f} "
            f"| | {q.fps:.3g} | | | |"
        )
    trained = [r for r in results if r.train is not None]
    if trained:
        lines += [
            "",
            "| model, one training step | input | dtype | GFLOPs (fwd+bwd) | step ms | images/s | GFLOP/s | efficiency "
            "| vs reference backend |",
            "| --- | --- | --- | ---: | ---: | ---: | ---: | ---: | --- |",
        ]
        for r in trained:
            t = r.train
            shape = f"{r.batch}x3x{r.size[0]}x{r.size[1]}, C={r.classes}"
            versus = "-" if t.speedup is None else f"{_ms(t.reference_step_ms)} ms: {t.speedup:.2f}x"
            lines.append(
                f"| {r.model} ({' + '.join(t.losses)}) | {shape} | {r.dtype} | {t.gflops:.4g} | {_ms(t.step_ms)} "
                f"| {t.images_per_s:.3g} | {t.achieved_gflops_per_s:.1f} | {t.efficiency:.0%} | {versus} |"
            )
    out = ["\n".join(lines), ""]
    for r in results:
        m, k, n = r.gemm_shape
        calls = ", ".join(f"{op} x{c}" for op, c in r.custom_op_calls.items()) or (
            "none, so the reference comparison runs the same code and its ratio is run-to-run noise"
            if r.speedup is not None
            else "none"
        )
        if r.params is not None and r.trainable_params is not None:
            out.append(f"{r.model}: {r.params:,} parameters, {r.trainable_params:,} trainable.")
        out.append(
            f"{r.dtype}: {r.timed_runs} timed runs on {r.threads} threads; efficiency = achieved GFLOP/s / "
            f"{r.gemm_gflops_per_s:.1f} GFLOP/s of a float32 torch.mm ({m}x{k} @ {k}x{n}, the model's largest "
            f"GEMM, timed in the same rounds). ovseg-fast ops called: {calls}."
        )
    for q in results[0].quoted:
        if q.note:
            out.append(f"{q.name} (quoted): {q.note}.")
    if breakdown:
        r = results[0]
        out += ["", "| module | GFLOPs | share |", "| --- | ---: | ---: |"]
        for name, g in r.module_gflops:
            out.append(f"| {name} | {g:.4g} | {g / r.gflops:.1%} |" if r.gflops else f"| {name} | {g:.4g} | - |")
        out += ["", "| op | GFLOPs | share |", "| --- | ---: | ---: |"]
        for op, g in r.op_gflops.items():
            out.append(f"| {op} | {g:.4g} | {g / r.gflops:.1%} |" if r.gflops else f"| {op} | {g:.4g} | - |")
    return "\n".join(out)

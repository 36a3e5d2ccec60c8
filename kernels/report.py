"""Static GPU check of the Triton kernels: compiled ahead of time for sm_80 (A100) and sm_90 (H100), no GPU.

``python -m ovseg_fast.kernels.report`` runs every op's Triton entry points (forward and backward) at the
benchmark shapes of ``bench/bench_<op>.py``, in every dtype the op's Triton kernels take, on ``meta``
tensors with the launches intercepted: each ``kernel[grid](...)`` call is recorded instead of run, so the
launch configurations (tiles, warps, stages, grids, constexprs, Triton's argument specialisation) are
exactly the ones the launchers choose, not a copy of their rules. Every distinct build is then compiled
with ``triton.compile(ASTSource(...), target=GPUTarget("cuda", cc, 32))`` (Triton's bundled LLVM and
ptxas; no driver) and read back:

``regs``      registers per thread, ``cuobjdump -res-usage`` of the cubin;
``spill``     bytes of per-thread stack frame (``STACK`` + ``LOCAL``); Triton kernels keep no local arrays, so
              any stack is register spills;
``smem``      dynamic shared memory of the build (Triton's metadata), against the per-block limit of the
              target (A100 166,912 B, H100 232,448 B), plus the 1 KiB the driver reserves per block;
``occ``       resident blocks per SM (registers, shared memory, threads and the 32-block limit) and the
              warp occupancy they give;
``dots``      how each ``tl.dot`` lowers, from the TTGIR: ``wgmma`` (sm_90 warp-group MMA), ``mma``
              (``mma.sync`` tensor cores), ``fma`` (CUDA cores; expected only for float32 with IEEE
              precision), with its operands' element type; ``HMMA`` / ``HGMMA`` instruction counts of
              the SASS confirm it;
``grid``      blocks of the launch against the SM count (A100 108, H100 132).

Findings (``python -m ovseg_fast.kernels.report`` exits 1 when any is an error; the CI test asserts none):

- ``smem``: the build needs more shared memory than a block may have: it would not launch;
- ``regs`` / ``spill``: more than 255 registers or any spill;
- ``fma``: a ``tl.dot`` of a float16 / bfloat16 launch that does not run on tensor cores (whatever its
  operands' type: float32 workspaces multiplied in float32 count), or a float32 dot on CUDA cores when
  torch allows TF32 (the ``tf32`` pseudo-dtype);
- ``grid``: a grid with fewer blocks than the GPU has SMs, unless the kernel's docstring has a ``Grid:``
  paragraph that says why (small problems, a sequential dependency); such rows are listed as ``documented``.

What this does not show: speed. Whether a kernel is memory- or latency-bound, how well its loads coalesce
and what it achieves on a real GPU only a GPU run measures (``ovseg-fast bench`` on a CUDA machine).

Cost and ``--subset``: compiling takes seconds per build (LLVM and ptxas, single-threaded). The default
compiles every distinct build of every launch. ``--subset`` (what CI runs) checks the grid of every launch
(it needs no compile) and compiles only the maximal builds (``maximal_builds``): builds of one kernel, dtype,
target, ``num_warps`` and pointer element types are ordered by their integer / boolean constexprs (tiles,
unrolled counts, feature flags) and stages, and a build another one covers in every size is checked
through it (its row shows the covering build's figures, ``"compiled": False``; see ``maximal_builds`` for what
that guarantees). ``--jobs N`` compiles in N
forked processes.

Builds are cached (``--cache-dir``, else ``$OVSEG_STATIC_CACHE``, else ``~/.cache/ovseg_fast/static_gpu``) by
the kernel's source hash (Triton's ``cache_key``, which covers the ``@triton.jit`` functions it calls), its
specialisation and the target: a warm run compiles nothing. Triton's own cache keeps the compiled binaries
(under ``<cache-dir>/triton`` with ``--cache-dir`` unless ``$TRITON_CACHE_DIR`` is set).

This uses Triton's launcher internals (``JITFunction.run``'s binder and ``_pack_args``, Triton 3.8) to turn a
recorded call into the ``ASTSource`` a real launch would compile. It must run without
``TRITON_INTERPRET=1`` (interpreted kernels cannot be compiled).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import hashlib
import importlib
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Callable, Optional

import torch

OPS = ("lpm", "moe", "routed_attention", "sinkhorn")
#: "tf32" is float32 with ``torch.backends.cuda.matmul.fp32_precision = "tf32"`` (the kernels follow it)
DTYPES = {"float32": torch.float32, "tf32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


@dataclasses.dataclass(frozen=True)
class Target:
    """A GPU the kernels are compiled for (per-SM figures from NVIDIA's tuning guides)."""

    name: str
    capability: int
    sms: int
    smem_per_block: int  # opt-in maximum of dynamic shared memory per block
    smem_per_sm: int
    regs_per_sm: int = 65536
    max_warps_per_sm: int = 64
    max_blocks_per_sm: int = 32
    reserved_smem_per_block: int = 1024


TARGETS = {
    80: Target("A100", 80, sms=108, smem_per_block=166_912, smem_per_sm=167_936),
    90: Target("H100", 90, sms=132, smem_per_block=232_448, smem_per_sm=233_472),
}


# --------------------------------------------------------------------------------------------------
# Recording the launches
# --------------------------------------------------------------------------------------------------


@dataclasses.dataclass
class Launch:
    """One ``kernel[grid](*args, **kwargs)`` call of a launcher."""

    op: str
    case: str
    dtype: str
    kernel: Any  # triton.runtime.jit.JITFunction
    args: tuple
    kwargs: dict
    grid: tuple[int, int, int]

    @property
    def name(self) -> str:
        return self.kernel.fn.__name__

    @property
    def blocks(self) -> int:
        return self.grid[0] * self.grid[1] * self.grid[2]


@contextlib.contextmanager
def recording(sink: list) -> Iterator[None]:
    """Within the block every Triton launch appends ``(kernel, args, kwargs, grid)`` to ``sink`` and runs
    nothing (the launchers are driven with ``meta`` tensors, which have shapes, strides and dtypes but no
    data)."""
    from triton.runtime.jit import JITFunction

    original = JITFunction.run

    def run(self, *args, grid, warmup, **kwargs):
        if callable(grid):
            raise NotImplementedError(f"{self.fn.__name__}: callable grids are not recorded")
        g = tuple(int(x) for x in grid) + (1,) * (3 - len(grid))
        sink.append((self, args, kwargs, g))

    # bincount's size depends on the data; launchers call it with keys < minlength (routed attention's
    # inverse index), so minlength is its size. Registered for the block only.
    lib = torch.library.Library("aten", "IMPL")
    lib.impl(
        "bincount",
        lambda x, weights=None, minlength=0: x.new_empty((minlength,), dtype=torch.int64),
        "Meta",
    )
    JITFunction.run = run
    try:
        yield
    finally:
        JITFunction.run = original
        lib._destroy()


def _meta(*shape, dtype=torch.float32) -> torch.Tensor:
    return torch.empty(*shape, dtype=dtype, device="meta")


def _constant_expr(node) -> bool:
    """Literals and arithmetic on them only (``(4096, 64, 2 * 4)``): safe to evaluate."""
    import ast

    allowed = (ast.Constant, ast.Tuple, ast.List, ast.Dict, ast.BinOp, ast.UnaryOp, ast.operator, ast.unaryop,
               ast.Load, ast.expr_context)  # fmt: skip
    return all(isinstance(n, allowed) for n in ast.walk(node))


def _bench_cases(op: str) -> dict:
    """The benchmark shapes of ``bench/bench_<op>.py`` (read from its source: the module imports pytest)."""
    import ast

    import ovseg_fast

    roots = [Path(ovseg_fast.__file__).resolve().parent / "bench", Path(__file__).resolve().parent.parent / "bench"]
    for root in roots:
        path = root / f"bench_{op}.py"
        if path.is_file():
            tree = ast.parse(path.read_text())
            values = {}
            for node in tree.body:
                if isinstance(node, ast.Assign) and len(node.targets) == 1 and isinstance(node.targets[0], ast.Name):
                    if _constant_expr(node.value):
                        values[node.targets[0].id] = eval(compile(ast.Expression(node.value), str(path), "eval"), {})
            return values
    raise FileNotFoundError(f"bench_{op}.py not found under {', '.join(map(str, roots))}")


def _lpm_calls(dtype: torch.dtype) -> Iterator[tuple[str, Callable[[], Any]]]:
    """LPM head as ``bench/bench_lpm.py`` runs it: text branch (mode c, shared text, LayerNorm with bias),
    image branch + logits on a channel-first feature map; inference (save=False) and training."""
    lpm = importlib.import_module("ovseg_fast.kernels.lpm")
    for case, (b, c, h, w, d, d_out) in _bench_cases("lpm")["CASES"].items():
        n = h * w

        def run(b=b, c=c, d=d, d_out=d_out, n=n):
            m = lambda *s: _meta(*s, dtype=dtype)
            text, cls = m(1, c, d), m(b, d)
            wt, bt, gt, ht = m(d_out, 2 * d), m(d_out), m(d_out), m(d_out)
            emb, xt, rt = lpm.hcl_forward(text, cls, wt, bt, gt, ht, "c", 1e-5)
            pixels = m(b, d, n).transpose(1, 2)  # (B, N, D) view of (B, D, H, W)
            wi, bi, gi, hi = m(d_out, d), m(d_out), m(d_out), m(d_out)
            lpm.logits_forward(pixels, emb, wi, bi, gi, hi, 1e-5, 10.0, False)
            logits, xi, ri = lpm.logits_forward(pixels, emb, wi, bi, gi, hi, 1e-5, 10.0, True)
            _, g_emb, *_ = lpm.logits_backward(logits, pixels, emb, wi, bi, gi, hi, xi, ri, 10.0)
            lpm.hcl_backward(g_emb, text, cls, wt, gt, xt, rt, "c", True, True)

        yield case, run


def _moe_calls(dtype: torch.dtype) -> Iterator[tuple[str, Callable[[], Any]]]:
    """Noisy top-k gating, dispatch and combine at ``bench/bench_moe.py``'s shapes (D = its ``D``)."""
    moe = importlib.import_module("ovseg_fast.kernels.moe")
    cases = _bench_cases("moe")
    d = cases["D"]
    for case, (t, e, k) in cases["CASES"].items():

        def run(t=t, e=e, k=k):
            logits, noise, noise_logits = _meta(t, e, dtype=dtype), _meta(t, e, dtype=dtype), _meta(t, e, dtype=dtype)
            w, idx, counts, _, row_lse, stats, nxt = moe.gating_forward(logits, noise, noise_logits, k, True)
            # the backward reads one loss weight on the host: a CPU scalar tensor mixes with meta tensors
            grad_losses = torch.ones(4)
            saved = (w, idx, counts, row_lse, stats, nxt)
            moe.gating_backward(w, grad_losses, logits, noise, noise_logits, *saved, k, True)
            x = _meta(t, d, dtype=dtype)
            xs, _, order, inverse = moe.dispatch_forward(x, idx, e)
            moe.dispatch_backward(xs, inverse, t, k)
            inverse = moe.combine_inverse(order)
            out = moe.combine_forward(xs, w, inverse)
            moe.combine_backward(out, xs, w, order, inverse)

        yield case, run


def _routed_attention_calls(dtype: torch.dtype) -> Iterator[tuple[str, Callable[[], Any]]]:
    """Routed attention forward and backward at ``bench/bench_routed_attention.py``'s shapes (shared routing)."""
    ra = importlib.import_module("ovseg_fast.kernels.routed_attention")
    for case, (b, hh, h, w, d, n, topk) in _bench_cases("routed_attention")["CASES"].items():

        def run(b=b, hh=hh, h=h, w=w, d=d, n=n, topk=topk):
            q, k, v = (_meta(b, hh, h, w, d, dtype=dtype) for _ in range(3))
            idx = _meta(b, 1, n * n, topk, dtype=torch.int64)
            out, lse = ra.routed_attention_forward(q, k, v, idx, n, n, d**-0.5)
            ra.routed_attention_backward(out, q, k, v, out, lse, idx, n, n, d**-0.5)

        yield case, run


#: PixelCLIP's real problem (one image, 6144 pixels, 64 clusters), beside the benchmark's
SINKHORN_EXTRA = {"pixelclip-real B=1 N=6144 K=64": (1, 6144, 64)}


def _sinkhorn_calls(dtype: torch.dtype) -> Iterator[tuple[str, Callable[[], Any]]]:
    """Sinkhorn forward and backward at ``bench/bench_sinkhorn.py``'s shapes and PixelCLIP's B = 1 problem."""
    sk = importlib.import_module("ovseg_fast.kernels.sinkhorn")
    bench = _bench_cases("sinkhorn")
    n_iters = bench.get("N_ITERS", 3)
    for case, (b, n, k) in {**bench["CASES"], **SINKHORN_EXTRA}.items():

        def run(b=b, n=n, k=k):
            scores, mask = _meta(b, n, k, dtype=dtype), _meta(b, n, dtype=torch.bool)
            rows, cols = _meta(b, n), _meta(b, k)
            plan, log_u, log_v, n_done = sk.sinkhorn_forward(scores, mask, rows, cols, 0.05, n_iters, 0.0, 1)
            sk.sinkhorn_backward(plan, scores, mask, rows, cols, log_u, log_v, n_done, 0.05)

        yield case, run


CALLS = {
    "lpm": _lpm_calls,
    "moe": _moe_calls,
    "routed_attention": _routed_attention_calls,
    "sinkhorn": _sinkhorn_calls,
}


@contextlib.contextmanager
def _fp32_precision(value: str) -> Iterator[None]:
    matmul = torch.backends.cuda.matmul
    before = matmul.fp32_precision
    matmul.fp32_precision = value
    try:
        yield
    finally:
        matmul.fp32_precision = before


def collect_launches(ops=OPS, dtypes=tuple(DTYPES)) -> list[Launch]:
    """Every launch the ops' Triton entry points make at the benchmark shapes, per dtype."""
    if os.environ.get("TRITON_INTERPRET", "0") == "1":
        raise RuntimeError("the static check compiles the kernels: run it without TRITON_INTERPRET=1")
    launches = []
    for op in ops:
        if op not in CALLS:
            raise ValueError(f"unknown op {op!r}; expected one of {', '.join(OPS)}")
        for dt in dtypes:
            if dt not in DTYPES:
                raise ValueError(f"unknown dtype {dt!r}; expected one of {', '.join(DTYPES)}")
            for case, run in CALLS[op](DTYPES[dt]):
                sink: list = []
                with recording(sink), _fp32_precision("tf32" if dt == "tf32" else "ieee"):
                    run()
                launches += [Launch(op, case, dt, *rec) for rec in sink]
    return launches


# --------------------------------------------------------------------------------------------------
# Compiling and reading a build
# --------------------------------------------------------------------------------------------------


def _triton_tool(name: str) -> str:
    import triton

    path = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / name
    if not path.is_file():
        raise FileNotFoundError(f"{name} is not bundled with this Triton ({path})")
    return str(path)


def _source(launch: Launch, capability: int):
    """``(ASTSource, options, target)`` exactly as ``JITFunction.run`` would build them on that GPU."""
    from triton import knobs
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource, make_backend
    from triton.runtime.jit import create_function_from_signature

    fn = launch.kernel
    target = GPUTarget("cuda", capability, 32)
    backend = make_backend(target)
    binder = create_function_from_signature(fn.signature, fn.params, backend)
    kwargs = dict(launch.kwargs)
    kwargs["debug"] = kwargs.get("debug", fn.debug) or knobs.runtime.debug
    kwargs["instrumentation_mode"] = knobs.compilation.instrumentation_mode
    bound, specialization, options = binder(*launch.args, **kwargs)
    options, signature, constexprs, attrs = fn._pack_args(backend, kwargs, bound, specialization, options)
    return ASTSource(fn, signature, constexprs, attrs), options, target


def build_key(launch: Launch, capability: int) -> str:
    import triton

    src, options, _ = _source(launch, capability)
    desc = repr(
        (
            triton.__version__,
            launch.kernel.cache_key,
            src.signature,
            sorted(map(repr, src.constants.items())),
            sorted(map(repr, src.attrs.items())),
            sorted(map(repr, options.__dict__.items())),
            capability,
        )
    )
    return hashlib.sha256(desc.encode()).hexdigest()


_ENCODING = re.compile(r"^(#[\w.]+) = (#[\w.]+)<", re.M)
_DOT = re.compile(
    r"= (tt\.dot|ttng\.warp_group_dot|tt\.dot_scaled) .*?: (?:tensor|!ttg\.memdesc)<[\dx]+x(\w+)[,>].*?"
    r"-> tensor<[^,>]+, (#\w+)"
)


def _dots(ttgir: str) -> list[dict]:
    """Each ``tl.dot`` of the TTGIR: operand element type and where it runs (wgmma / mma / fma)."""
    encodings = dict(_ENCODING.findall(ttgir))
    dots = []
    for op, elem, enc in _DOT.findall(ttgir):
        if op == "ttng.warp_group_dot":
            unit = "wgmma"
        elif "nvidia_mma" in encodings.get(enc, "") or "mma" in enc:
            unit = "mma"
        else:
            unit = "fma"
        dots.append({"dtype": elem, "unit": unit})
    return dots


def _res_usage(cubin: bytes, name: str) -> dict:
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        tool = _triton_tool("cuobjdump")
        res = subprocess.run([tool, "-res-usage", f.name], capture_output=True, text=True, check=True)
        sass = subprocess.run([tool, "-sass", f.name], capture_output=True, text=True, check=True)
    fields = {}
    for line in res.stdout.splitlines():
        if "REG:" in line:
            fields = {k: int(v) for k, v in re.findall(r"(\w+(?:\[\d+\])?):(\d+)", line)}
    return {
        "regs": fields.get("REG", 0),
        "spill": fields.get("STACK", 0) + fields.get("LOCAL", 0),
        "hmma": len(re.findall(r"\bHMMA\b", sass.stdout)),
        "hgmma": len(re.findall(r"\bHGMMA\b", sass.stdout)),
        "ffma": len(re.findall(r"\bFFMA\b", sass.stdout)),
    }


def cache_dir() -> Path:
    return Path(os.environ.get("OVSEG_STATIC_CACHE", Path.home() / ".cache" / "ovseg_fast" / "static_gpu"))


def compile_build(launch: Launch, capability: int, *, use_cache: bool = True) -> dict:
    """Resources of the launch's build for ``sm_<capability>``: regs, spill, smem, warps, stages, dots."""
    import triton

    key = build_key(launch, capability)
    path = cache_dir() / f"{key}.json"
    if use_cache and path.is_file():
        return json.loads(path.read_text())
    src, options, target = _source(launch, capability)
    t0 = time.perf_counter()
    compiled = triton.compile(src, target=target, options=options.__dict__)
    md = compiled.metadata
    info = {
        "kernel": launch.name,
        "capability": capability,
        "smem": int(md.shared),
        "warps": int(md.num_warps),
        "stages": int(md.num_stages),
        "dots": _dots(compiled.asm["ttgir"]),
        "compile_s": round(time.perf_counter() - t0, 2),
        **_res_usage(compiled.asm["cubin"], launch.name),
    }
    if use_cache:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_text(json.dumps(info))
        tmp.replace(path)
    return info


# --------------------------------------------------------------------------------------------------
# Analysis
# --------------------------------------------------------------------------------------------------


def occupancy(info: dict, target: Target) -> tuple[int, float]:
    """``(blocks per SM, warp occupancy)`` from registers (allocated per warp in 256-register units),
    shared memory, threads and the block limit."""
    warps = info["warps"]
    regs_per_warp = -(-max(info["regs"], 1) * 32 // 256) * 256
    by_regs = (target.regs_per_sm // regs_per_warp) // warps
    smem = info["smem"] + target.reserved_smem_per_block
    by_smem = target.smem_per_sm // smem if info["smem"] <= target.smem_per_block else 0
    blocks = min(by_regs, by_smem, target.max_warps_per_sm // warps, target.max_blocks_per_sm)
    return blocks, blocks * warps / target.max_warps_per_sm


def _grid_note(kernel) -> Optional[str]:
    doc = kernel.fn.__doc__ or ""
    m = re.search(r"Grid:\s*(.+?)(?:\n\s*\n|$)", doc, re.S)
    return " ".join(m.group(1).split()) if m else None


def findings(launch: Launch, info: dict, target: Target) -> list[tuple[str, str]]:
    """``[(kind, message)]``: kinds ``smem``, ``regs``, ``spill``, ``fma``, ``grid`` are errors,
    ``grid-documented`` is not."""
    out = []
    if info["smem"] > target.smem_per_block:
        limit = target.smem_per_block
        out.append(("smem", f"{info['smem']} B of shared memory > {limit} B per block: will not launch"))
    if info["regs"] > 255:
        out.append(("regs", f"{info['regs']} registers per thread"))
    if info["spill"]:
        out.append(("spill", f"{info['spill']} B of stack per thread (register spills)"))
    for d in info["dots"]:
        # a bfloat16 op whose dot multiplies float32 tiles (a workspace mixed in) is off the tensor cores too
        if d["unit"] == "fma" and (d["dtype"] in ("bf16", "f16") or launch.dtype in ("bfloat16", "float16")):
            out.append(("fma", f"a {d['dtype']} tl.dot of a {launch.dtype} launch runs on FFMA, not tensor cores"))
        if launch.dtype == "tf32" and d["dtype"] == "f32" and d["unit"] == "fma":
            out.append(("fma", "a float32 tl.dot runs on FFMA although torch allows TF32"))
    if any(d["unit"] != "fma" for d in info["dots"]) and not (info["hmma"] or info["hgmma"]):
        out.append(("fma", "tensor-core dots in the TTGIR but no HMMA/HGMMA instruction in the SASS"))
    if launch.blocks < target.sms:
        note = _grid_note(launch.kernel)
        msg = f"{launch.blocks} blocks for {target.sms} SMs"
        out.append(("grid-documented", f"{msg}; {note}") if note else ("grid", msg))
    return out


ERRORS = ("smem", "regs", "spill", "fma", "grid")


def _dot_summary(dots: list[dict]) -> str:
    if not dots:
        return "-"
    counts: dict[str, int] = {}
    for d in dots:
        k = f"{d['dtype']}:{d['unit']}"
        counts[k] = counts.get(k, 0) + 1
    return " ".join(f"{k}x{v}" if v > 1 else k for k, v in sorted(counts.items()))


def _build_shape(launch: Launch, capability: int) -> tuple[tuple, dict]:
    """``(fixed, sizes)`` of the launch's build: ``sizes`` are its integer and boolean ``tl.constexpr``s and
    ``num_stages`` (tiles, unrolled counts, optional features: larger asks more of the GPU), ``fixed`` the rest
    that selects the code (kernel, dtype, target, ``num_warps``, pointer element types, string constexprs).
    Triton's specialisation of plain integer arguments (``== 1``, divisible by 16) is in neither: builds that
    differ only there compile the same tiles."""
    src, options, _ = _source(launch, capability)
    fn = launch.kernel
    sizes, strings = {}, []
    for (index,), value in src.constants.items():
        if fn.params[index].is_constexpr:
            if isinstance(value, (bool, int)):
                sizes[fn.arg_names[index]] = int(value)
            else:
                strings.append((fn.arg_names[index], repr(value)))
    sizes["num_stages"] = options.num_stages
    pointers = tuple(sorted((n, t) for n, t in src.signature.items() if t.startswith("*")))
    fixed = (launch.name, launch.dtype, capability, options.num_warps, pointers, tuple(sorted(strings)))
    return fixed, sizes


def _covers(a: dict, b: dict) -> bool:
    return all(a[k] >= b[k] for k in b)


def maximal_builds(launches: list[Launch], capabilities) -> dict[tuple[int, int], str]:
    """``{(launch index, capability): build key}`` mapping every launch to the build compiled for it: among the
    builds of the same ``fixed`` part (``_build_shape``), only the maximal ones by ``sizes`` (no other build
    is at least as large in every size) are compiled, and each other build is checked through a maximal
    build that covers it. The premise: a larger tile, more stages, a larger unrolled count or an optional
    feature switched on needs at least the shared memory of the smaller build, spills first and lowers its
    dots the same way. Checked against the full run (every build compiled) of the kernels at 3 Dec 2026:
    in all 388 covered (launch, target) pairs the covered build's findings were a subset of its cover's and
    its shared memory and spills no larger; ptxas's register count is not monotone (11 pairs: a smaller
    LPM GEMM / routed-attention build took up to 42 registers more, none spilling), so a covered row's
    ``regs`` and occupancy are the cover's, not a bound. The full run stays the reference."""
    shapes: dict[str, tuple] = {}
    key_of = {}
    for i, launch in enumerate(launches):
        for cap in capabilities:
            key = build_key(launch, cap)
            key_of[(i, cap)] = key
            if key not in shapes:
                shapes[key] = _build_shape(launch, cap)
    groups: dict[tuple, dict[str, dict]] = {}
    for key, (fixed, sizes) in shapes.items():
        groups.setdefault(fixed, {})[key] = sizes
    cover = {}
    for members in groups.values():
        tops = [k for k, s in members.items() if not any(o != s and _covers(o, s) for o in members.values())]
        tops = list({repr(sorted(members[k].items())): k for k in tops}.values())  # equal sizes: one build
        for key, sizes in members.items():
            # the largest covering build, then the first: deterministic whatever the launch order
            cover[key] = max((t for t in tops if _covers(members[t], sizes)), key=lambda t: sum(members[t].values()))
    return {ik: cover[key] for ik, key in key_of.items()}


_POOL_LAUNCHES: list = []


def _compile_in_worker(job: tuple[int, int, bool]) -> dict:
    index, capability, use_cache = job
    return compile_build(_POOL_LAUNCHES[index], capability, use_cache=use_cache)


def _compile_all(jobs: dict[str, tuple[int, int]], launches: list[Launch], n_jobs: int, use_cache: bool, log):
    """``{build key: info}`` for ``jobs = {key: (launch index, capability)}``, in ``n_jobs`` forked processes
    (compiling is single-threaded: LLVM and ptxas)."""
    done = {}
    todo = []
    for key, (i, cap) in jobs.items():
        path = cache_dir() / f"{key}.json"
        if use_cache and path.is_file():
            done[key] = json.loads(path.read_text())
        else:
            todo.append((key, i, cap))
    if n_jobs > 1 and len(todo) > 1:
        import concurrent.futures
        import multiprocessing

        _POOL_LAUNCHES[:] = launches  # inherited by the forked workers: launches hold JITFunctions
        try:
            ctx = multiprocessing.get_context("fork")
            with concurrent.futures.ProcessPoolExecutor(n_jobs, mp_context=ctx) as pool:
                futures = {pool.submit(_compile_in_worker, (i, cap, use_cache)): key for key, i, cap in todo}
                for future in concurrent.futures.as_completed(futures):
                    done[futures[future]] = info = future.result()
                    if log:
                        log(f"  built {info['kernel']} sm_{info['capability']} ({info['compile_s']} s)")
        finally:
            _POOL_LAUNCHES.clear()
    else:
        for key, i, cap in todo:
            done[key] = info = compile_build(launches[i], cap, use_cache=use_cache)
            if log:
                log(f"  built {launches[i].op}/{info['kernel']} {launches[i].dtype} sm_{cap} ({info['compile_s']} s)")
    return done


def run_report(
    ops=OPS, dtypes=tuple(DTYPES), capabilities=(80, 90), *, kernels=None, subset=False, use_cache=True, jobs=1,
    log=None,
) -> list[dict]:
    """One row per (launch, target), each with its build's resources and findings; ``kernels`` keeps only
    those kernel names. ``subset`` compiles only the maximal builds (``maximal_builds``): a row whose own build
    was not compiled (``"compiled": False``) shows the figures of the build that covers it, an upper bound;
    its grid is its own. ``jobs`` compiles in that many processes."""
    launches = collect_launches(ops, dtypes)
    if kernels:
        launches = [x for x in launches if x.name in kernels]
    if subset:
        chosen = maximal_builds(launches, capabilities)
    else:
        chosen = {(i, cap): build_key(x, cap) for i, x in enumerate(launches) for cap in capabilities}
    wanted: dict[str, tuple[int, int]] = {}
    for (i, cap), key in chosen.items():
        wanted.setdefault(key, (i, cap))
    own = {(i, cap): build_key(x, cap) for i, x in enumerate(launches) for cap in capabilities} if subset else chosen
    infos = _compile_all(wanted, launches, jobs, use_cache, log)
    rows = []
    for i, launch in enumerate(launches):
        for cap in capabilities:
            target = TARGETS[cap]
            key = chosen[(i, cap)]
            info = infos[key]
            blocks, occ = occupancy(info, target)
            rows.append({
                "op": launch.op, "case": launch.case, "dtype": launch.dtype, "kernel": launch.name,
                "target": f"sm_{cap}", "grid": list(launch.grid), "blocks": launch.blocks, "build": key[:12],
                "compiled": key == own[(i, cap)], "blocks_per_sm": blocks, "occupancy": round(occ, 3),
                **{k: info[k] for k in ("regs", "spill", "smem", "warps", "stages", "hmma", "hgmma")},
                "dots": _dot_summary(info["dots"]),
                "findings": findings(launch, info, target),
            })  # fmt: skip
    return rows


def format_table(rows: list[dict]) -> str:
    head = ("op", "kernel", "dtype", "case", "target", "regs", "spill", "smem", "warps", "stg", "blk/SM", "occ",
            "dots", "grid", "findings")  # fmt: skip
    lines = []
    for r in rows:
        errs = [k for k, _ in r["findings"] if k in ERRORS]
        doc = any(k == "grid-documented" for k, _ in r["findings"])
        lines.append((
            r["op"], r["kernel"], r["dtype"], r["case"], r["target"], str(r["regs"]), str(r["spill"]), str(r["smem"]),
            str(r["warps"]), str(r["stages"]), str(r["blocks_per_sm"]), f"{r['occupancy']:.2f}", r["dots"],
            "x".join(map(str, r["grid"])), ",".join(errs) + ("(grid documented)" if doc else "") or "ok",
        ))  # fmt: skip
    widths = [max(len(h), *(len(x[i]) for x in lines)) if lines else len(h) for i, h in enumerate(head)]
    fmt = " | ".join(f"{{:<{w}}}" for w in widths)
    out = [fmt.format(*head), "-|-".join("-" * w for w in widths)]
    out += [fmt.format(*x) for x in lines]
    return "\n".join(out)


def main(argv: Optional[list[str]] = None) -> int:
    p = argparse.ArgumentParser(prog="python -m ovseg_fast.kernels.report", description=__doc__.split("\n\n")[0])
    p.add_argument("--op", action="append", choices=OPS, help="op(s) to check (default: all)")
    p.add_argument("--dtype", action="append", choices=tuple(DTYPES), help="dtype(s) (default: all)")
    p.add_argument("--target", action="append", type=int, choices=sorted(TARGETS), help="compute capability")
    p.add_argument("--kernel", action="append", help="kernel name(s), e.g. _gemm_kernel (default: all)")
    p.add_argument("--subset", action="store_true",
                   help="compile only the maximal builds (grids of every launch are still checked); default: all")
    p.add_argument("--jobs", type=int, default=1, help="compile in this many processes (default 1)")
    p.add_argument("--cache-dir", type=Path,
                   help="cache of build figures (default $OVSEG_STATIC_CACHE or ~/.cache/ovseg_fast/static_gpu); "
                        "Triton's binaries go to its triton/ subdirectory unless $TRITON_CACHE_DIR is set")
    p.add_argument("--json", type=Path, help="also write the rows to this JSON file")
    p.add_argument("--no-cache", action="store_true", help="recompile every build (Triton's own cache still applies)")
    p.add_argument("--details", action="store_true", help="print every finding's message")
    a = p.parse_args(argv)
    if a.jobs < 1:
        p.error(f"--jobs must be >= 1, got {a.jobs}")
    if a.cache_dir is not None:
        if a.cache_dir.exists() and not a.cache_dir.is_dir():
            p.error(f"--cache-dir {a.cache_dir} exists and is not a directory")
        os.environ["OVSEG_STATIC_CACHE"] = str(a.cache_dir)
        os.environ.setdefault("TRITON_CACHE_DIR", str(a.cache_dir / "triton"))
    t0 = time.perf_counter()
    rows = run_report(
        tuple(a.op or OPS),
        tuple(a.dtype or DTYPES),
        tuple(a.target or sorted(TARGETS)),
        kernels=a.kernel,
        subset=a.subset,
        use_cache=not a.no_cache,
        jobs=a.jobs,
        log=lambda s: print(s, file=sys.stderr, flush=True),
    )
    print(format_table(rows))
    errors = [(r, k, m) for r in rows for k, m in r["findings"] if k in ERRORS]
    if a.details:
        for r in rows:
            for k, m in r["findings"]:
                print(f"{r['op']}/{r['kernel']} {r['dtype']} {r['case']} {r['target']}: {k}: {m}")
    builds = len({r["build"] for r in rows})
    print(f"\n{len(rows)} launches x targets, {builds} builds compiled, {len(errors)} errors, "
          f"{time.perf_counter() - t0:.1f} s")  # fmt: skip
    if a.json:
        a.json.write_text(json.dumps(rows, indent=1))
    return 1 if errors else 0


if __name__ == "__main__":
    sys.exit(main())

"""Builds ovseg_fast._C, the C++ CPU kernels, against the torch that is already installed.

Build isolation: the extension links against libtorch, so it must be compiled with the very torch it
will run with. Install with ``pip install --no-build-isolation .`` (torch, setuptools, wheel and
ninja already installed); an isolated build would fetch some other torch into a throwaway
environment and produce an extension that cannot load. Without torch this script stops and says so.

Environment variables:
  OVSEG_NO_EXT=1    install the pure-Python package (every op runs its reference implementation).
  OVSEG_NATIVE=1    add -march=native (faster on this machine, not portable).
  OVSEG_DEBUG=1     -O0 -g instead of -O3.
  MAX_JOBS=N        parallel compile jobs (defaults to the number of cores).

Each csrc/<op>.cpp is compiled once per CPU capability (see csrc/cpu_dispatch.h): the DEFAULT copy by
torch's ninja build together with csrc/ovseg_fast.cpp, the AVX2 and AVX512 copies here with their
own -m flags (setuptools has no per-file flags), in parallel, and linked into the same module.
"""

from __future__ import annotations

import concurrent.futures
import os
import platform
import shlex
import subprocess
import sys
import sysconfig
from pathlib import Path

from setuptools import setup

ROOT = Path(__file__).resolve().parent
CSRC = ROOT / "csrc"
PACKAGE_DIR = {"ovseg_fast.kernels": "kernels", "ovseg_fast.bench": "bench"}
PACKAGES = [
    "ovseg_fast", "ovseg_fast.cli", "ovseg_fast.models", "ovseg_fast.ops", "ovseg_fast.kernels", "ovseg_fast.bench",
    "ovseg_fast.compat", "ovseg_fast.compat.pydensecrf", "ovseg_fast.data", "ovseg_fast.train",
]

# Flags of the extra copies; the macros are the ones ATen's vec headers select Vectorized<T> by.
X86_VARIANTS = {
    "AVX2": ["-mavx2", "-mfma", "-mf16c", "-DCPU_CAPABILITY=AVX2", "-DCPU_CAPABILITY_AVX2"],
    "AVX512": [
        "-mavx512f",
        "-mavx512bw",
        "-mavx512vl",
        "-mavx512dq",
        "-mavx2",
        "-mfma",
        "-mf16c",
        "-DCPU_CAPABILITY=AVX512",
        "-DCPU_CAPABILITY_AVX512",
    ],
}


def _flag(name: str) -> bool:
    return os.environ.get(name, "0").lower() in {"1", "true", "yes", "on"}


def _op_sources() -> list[Path]:
    return sorted(p for p in CSRC.glob("*.cpp") if p.name != "ovseg_fast.cpp")


def _extensions_and_cmdclass():
    if _flag("OVSEG_NO_EXT"):
        print("ovseg-fast: OVSEG_NO_EXT=1, installing without the C++ extension", file=sys.stderr)
        return [], {}
    try:
        import torch
        from torch.utils.cpp_extension import BuildExtension, CppExtension
    except ImportError as exc:  # pragma: no cover - exercised by users, not tests
        raise SystemExit(
            "ovseg-fast compiles a C++ extension against the installed torch, and torch is not "
            f"importable here ({exc}).\nInstall torch first, then build without isolation:\n"
            "    pip install torch setuptools wheel ninja\n"
            "    pip install --no-build-isolation .\n"
            "or install without the extension: OVSEG_NO_EXT=1 pip install ."
        ) from exc

    x86 = platform.machine().lower() in {"x86_64", "amd64"}
    # -g0 overrides the -g that Python's sysconfig adds: debug info triples compile time and the .so size.
    opt = ["-O0", "-g"] if _flag("OVSEG_DEBUG") else ["-O3", "-g0"]
    common = [*opt, "-fopenmp", "-std=c++20", f'-DOVSEG_TORCH_VERSION="{torch.__version__}"', "-Wno-unused-function"]
    if _flag("OVSEG_NATIVE"):
        common.append("-march=native")
    if x86:
        common.append("-DOVSEG_HAVE_X86_VARIANTS")

    class BuildWithCapabilities(BuildExtension):
        """torch's BuildExtension plus the AVX2/AVX512 copies of every op file."""

        def build_extensions(self):
            if x86:
                for ext in self.extensions:
                    ext.extra_objects = list(ext.extra_objects or []) + self._compile_variants(ext)
            super().build_extensions()

        def _compile_variants(self, ext) -> list[str]:
            cxx = shlex.split(os.environ.get("CXX", "c++"))
            includes = [f"-I{d}" for d in ext.include_dirs] + [f"-I{sysconfig.get_paths()['include']}"]
            abi = f"-D_GLIBCXX_USE_CXX11_ABI={int(torch._C._GLIBCXX_USE_CXX11_ABI)}"
            # Objects of another torch are never reused (its headers differ).
            out_dir = Path(self.build_temp) / f"capabilities-torch-{torch.__version__}"
            out_dir.mkdir(parents=True, exist_ok=True)
            headers = list(CSRC.glob("*.h"))
            jobs = []
            for src in _op_sources():
                for name, flags in X86_VARIANTS.items():
                    obj = out_dir / f"{src.stem}.{name}.o"
                    newest_input = max(p.stat().st_mtime for p in [src, *headers])
                    cmd = [*cxx, "-c", str(src), "-o", str(obj), "-fPIC", abi, *common, *flags, *includes]
                    jobs.append((obj, cmd, obj.exists() and obj.stat().st_mtime >= newest_input))
            todo = [(obj, cmd) for obj, cmd, fresh in jobs if not fresh]
            workers = int(os.environ.get("MAX_JOBS", os.cpu_count() or 1))
            with concurrent.futures.ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
                for obj, _ in todo:
                    print(f"ovseg-fast: compiling {obj.name}", file=sys.stderr)
                results = list(pool.map(lambda job: subprocess.run(job[1], capture_output=True, text=True), todo))
            for (obj, cmd), res in zip(todo, results):
                if res.returncode != 0:
                    sys.stderr.write(res.stdout + res.stderr)
                    raise RuntimeError(f"compiling {obj.name} failed: {shlex.join(cmd)}")
            return [str(obj) for obj, _, _ in jobs]

    ext = CppExtension(
        name="ovseg_fast._C",
        sources=[str(p.relative_to(ROOT)) for p in [CSRC / "ovseg_fast.cpp", *_op_sources()]],
        include_dirs=[str(CSRC)],
        extra_compile_args={"cxx": [*common, "-DOVSEG_DISPATCH_ROOT"]},
        extra_link_args=["-fopenmp"],
    )
    return [ext], {"build_ext": BuildWithCapabilities.with_options(use_ninja=True)}


ext_modules, cmdclass = _extensions_and_cmdclass()

setup(
    packages=PACKAGES,
    package_dir=PACKAGE_DIR,
    ext_modules=ext_modules,
    cmdclass=cmdclass,
)

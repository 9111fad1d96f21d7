"""Build longmoe and its native CPU extension ``longmoe._C``.

The extension holds the C++ CPU kernels (csrc/), registered as ``torch.ops.longmoe.*``. It is built
with ninja through ``torch.utils.cpp_extension`` and needs torch at build time, so install with
``pip install --no-build-isolation .`` into an environment that already has torch (CPU or CUDA build;
the extension is CPU code either way, GPU paths are Triton).

Environment:
  LONGMOE_SKIP_NATIVE=1   build no extension; the package imports and uses the reference backend.
  LONGMOE_PORTABLE=1      compile for baseline x86-64 (AVX2/FMA) instead of -march=native.
"""

import glob
import os

from setuptools import setup

ext_modules = []
cmdclass = {}
if os.environ.get("LONGMOE_SKIP_NATIVE", "0") != "1":
    from torch.utils.cpp_extension import BuildExtension, CppExtension

    here = os.path.dirname(os.path.abspath(__file__))
    sources = sorted(
        os.path.relpath(p, here) for p in glob.glob(os.path.join(here, "csrc", "**", "*.cpp"), recursive=True)
    )
    # -O3 lets GCC vectorise the exp/rescale loops; the tile GEMMs go through the BLAS that torch ships.
    arch = ["-mavx2", "-mfma"] if os.environ.get("LONGMOE_PORTABLE") == "1" else ["-march=native"]
    if os.uname().machine not in ("x86_64", "AMD64"):
        arch = ["-mcpu=native"] if os.environ.get("LONGMOE_PORTABLE") != "1" else []
    ext_modules.append(
        CppExtension(
            name="longmoe._C",
            sources=sources,
            include_dirs=[os.path.join(here, "csrc")],
            extra_compile_args={"cxx": ["-O3", "-fopenmp", "-fno-math-errno", *arch]},
            extra_link_args=["-fopenmp"],
        )
    )
    cmdclass["build_ext"] = BuildExtension.with_options(use_ninja=True)

setup(ext_modules=ext_modules, cmdclass=cmdclass)

"""Build and install specforge_mcore.

* ``kernels/`` is installed as the subpackage ``specforge_mcore.kernels``.
* ``csrc/`` is built into ``specforge_mcore._C``: the C++ (CPU) sources always, the CUDA sources
  too when the installed torch is a CUDA build and ``nvcc`` is found (``CUDA_HOME``).

Install with ``pip install --no-build-isolation -e .`` so the build uses the torch already in the
environment (build isolation would fetch a second, CUDA, torch from the registry).
"""

import glob
import os

from setuptools import find_packages, setup

HERE = os.path.dirname(os.path.abspath(__file__))


def _extension_modules():
    cpp_sources = sorted(glob.glob(os.path.join("csrc", "*.cpp")))
    cuda_sources = sorted(glob.glob(os.path.join("csrc", "*.cu")))
    if not cpp_sources:
        return [], {}
    import torch
    from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension

    cxx_flags = ["-O3", "-std=c++17", "-fopenmp"]
    with_cuda = (
        torch.version.cuda is not None
        and CUDA_HOME is not None
        and os.environ.get("SPECFORGE_MCORE_NO_CUDA", "0") != "1"
    )
    if with_cuda and cuda_sources:
        ext = CUDAExtension(
            name="specforge_mcore._C",
            sources=cpp_sources + cuda_sources,
            define_macros=[("SPECFORGE_WITH_CUDA", "1")],
            extra_compile_args={
                "cxx": cxx_flags,
                "nvcc": ["-O3", "-std=c++17", "--use_fast_math", "-lineinfo"],
            },
            extra_link_args=["-fopenmp"],
        )
    else:
        ext = CppExtension(
            name="specforge_mcore._C",
            sources=cpp_sources,
            extra_compile_args={"cxx": cxx_flags},
            extra_link_args=["-fopenmp"],
        )
    return [ext], {"build_ext": BuildExtension.with_options(no_python_abi_suffix=False)}


ext_modules, cmdclass = _extension_modules()

setup(
    name="specforge_mcore",
    version="0.1.0",
    description="EAGLE-3 draft training against Megatron-Core hosted frozen MoE targets",
    python_requires=">=3.10",
    packages=find_packages(include=["specforge_mcore", "specforge_mcore.*"])
    + ["specforge_mcore.kernels"],
    package_dir={"specforge_mcore.kernels": "kernels"},
    package_data={"specforge_mcore": ["py.typed"]},
    ext_modules=ext_modules,
    cmdclass=cmdclass,
    entry_points={"console_scripts": ["specforge-mcore=specforge_mcore.cli:main"]},
)

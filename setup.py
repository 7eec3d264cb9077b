"""Builds fusion_engine._C (C++17, OpenMP, runtime-dispatched AVX2/AVX-512) from csrc/, without torch.

With FUSION_ENGINE_CUDA=1 and nvcc on PATH it also builds fusion_engine._C_cuda from csrc/cuda/.
The build is parallel: the C++ sources of each extension compile on a thread pool (pybind11's
ParallelCompile), and the .cu files compile with nvcc on their own pool, started before the C++
build so both overlap. FUSION_ENGINE_BUILD_JOBS sets the number of jobs (default: every CPU).
SIMD code paths are compiled with per-function target attributes and chosen at run time, so the
shared build runs on any x86-64 (and non-x86) machine: never -march=native.
"""

import glob
import os
import shutil
import subprocess
from concurrent.futures import ThreadPoolExecutor

from pybind11.setup_helpers import ParallelCompile, Pybind11Extension
from setuptools import setup
from setuptools.command.build_ext import build_ext

HERE = os.path.dirname(os.path.abspath(__file__))
CORE_SOURCES = sorted(glob.glob("csrc/core/*.cpp"))
# bindings of op families beside bind_core.cpp (bind_cuda.cpp belongs to the CUDA extension)
BIND_SOURCES = sorted(p for p in glob.glob("csrc/python/bind_*.cpp") if os.path.basename(p) not in ("bind_core.cpp", "bind_cuda.cpp"))
JOBS = int(os.environ.get("FUSION_ENGINE_BUILD_JOBS", "0")) or os.cpu_count() or 1
ParallelCompile("FUSION_ENGINE_BUILD_JOBS", default=JOBS).install()
CXX_FLAGS = ["-O3", "-fopenmp", "-fvisibility=hidden", "-fno-math-errno", "-ffp-contract=off", "-fwrapv"]

extensions = [
    Pybind11Extension(
        "fusion_engine._C",
        ["csrc/python/bind_core.cpp", *BIND_SOURCES, *CORE_SOURCES],
        include_dirs=["csrc/core", "csrc/include"],
        cxx_std=17,
        extra_compile_args=CXX_FLAGS,
        extra_link_args=["-fopenmp"],
    )
]

WANT_CUDA = os.environ.get("FUSION_ENGINE_CUDA", "0") not in ("", "0")
if WANT_CUDA:
    extensions.append(
        Pybind11Extension(
            "fusion_engine._C_cuda",
            ["csrc/python/bind_cuda.cpp"],
            include_dirs=["csrc/core", "csrc/cuda", "csrc/include"],
            cxx_std=17,
            extra_compile_args=["-O3"],
        )
    )


def _cuda_home_from_nvcc(nvcc):
    """The toolkit root nvcc reports (`_HERE_` of --dryrun), robust to wrapper scripts on PATH."""
    out = subprocess.run([nvcc, "--dryrun", "-c", "-x", "cu", os.devnull, "-o", os.devnull], capture_output=True, text=True)
    for line in (out.stdout + out.stderr).splitlines():
        if "_HERE_=" in line:
            return os.path.dirname(line.split("_HERE_=", 1)[1].strip())
    return os.path.dirname(os.path.dirname(os.path.realpath(nvcc)))


class BuildExt(build_ext):
    """Compiles csrc/cuda/*.cu with nvcc (in parallel, overlapping the C++ build) and links them into
    fusion_engine._C_cuda."""

    def run(self):
        self._cuda_jobs = None
        if any(ext.name == "fusion_engine._C_cuda" for ext in self.extensions):
            self._cuda_jobs = self._start_cuda_objects()
        try:
            super().run()
        finally:
            if self._cuda_jobs is not None:
                self._cuda_jobs[0].shutdown(wait=True)

    def build_extension(self, ext):
        if ext.name == "fusion_engine._C_cuda":
            self._add_cuda_objects(ext)
        super().build_extension(ext)

    def _start_cuda_objects(self):
        nvcc = shutil.which("nvcc") or os.path.join(os.environ.get("CUDA_HOME", "/usr/local/cuda"), "bin", "nvcc")
        if not os.path.exists(nvcc):
            raise RuntimeError("FUSION_ENGINE_CUDA=1 but nvcc was not found (set CUDA_HOME or PATH)")
        self._cuda_home = os.environ.get("CUDA_HOME") or _cuda_home_from_nvcc(nvcc)
        archs = os.environ.get("FUSION_ENGINE_CUDA_ARCHS", "80;90").split(";")
        gencode = [f"-gencode=arch=compute_{a},code=sm_{a}" for a in archs]
        out_dir = os.path.join(self.build_temp, "cuda")
        os.makedirs(out_dir, exist_ok=True)
        pool = ThreadPoolExecutor(max_workers=JOBS)
        jobs = []
        for src in sorted(glob.glob("csrc/cuda/*.cu")):
            obj = os.path.join(out_dir, os.path.basename(src) + ".o")
            cmd = [nvcc, "-c", src, "-o", obj, "-O3", "-std=c++17", "-Xcompiler", "-fPIC",
                   "-Icsrc/core", "-Icsrc/cuda", "-Icsrc/include", *gencode]
            print(" ".join(cmd))
            jobs.append((obj, pool.submit(subprocess.check_call, cmd, cwd=HERE)))
        return pool, jobs

    def _add_cuda_objects(self, ext):
        _, jobs = self._cuda_jobs
        for obj, job in jobs:
            job.result()  # re-raises a failed nvcc
            ext.extra_objects.append(obj)
        ext.include_dirs.append(os.path.join(self._cuda_home, "include"))
        ext.library_dirs.append(os.path.join(self._cuda_home, "lib64"))
        ext.libraries += ["cudart_static", "rt", "pthread", "dl"]


setup(ext_modules=extensions, cmdclass={"build_ext": BuildExt})

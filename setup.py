"""Build script. Metadata lives in pyproject.toml; this file maps the package layout and builds the
compiled extension.

``kernels/`` (Triton) ships as the subpackage ``fastmask.kernels``, never as a top-level
``kernels`` module (a PyPI package already has that name).

The extension ``fastmask._C`` (op library ``fastmask_ext``, loaded by ``fastmask/_ext.py`` with
``torch.ops.load_library``) is built from ``csrc/``:

* the C++ CPU kernels (OpenMP) whenever torch and a C++ compiler are present;
* the CUDA kernels too when torch was built with CUDA and ``nvcc`` is found.

Switches (environment variables):

* ``FASTMASK_SKIP_EXT=1``: no extension at all (pure-Python install; the reference backend and
  Triton serve every call).
* ``FASTMASK_SKIP_CUDA=1``: C++ only, even where CUDA is available.
* ``FASTMASK_CUDA_ARCHS``: compute capabilities, ``;``/``,``/space separated; a trailing ``+PTX``
  also embeds PTX for the highest one. Default ``80;90;100;120+PTX`` (A100/RTX 30-40, H100/H200,
  B100/B200, RTX 50/Blackwell workstation; PTX lets newer GPUs JIT the kernels), reduced to the
  archs the found ``nvcc --list-gpu-arch`` supports (PTX then for the highest one kept).
* ``CUDA_HOME`` (or ``CUDA_PATH``): the CUDA toolkit to build with. Without it the toolkit is the
  one ``nvcc`` on ``PATH`` belongs to (symlinks and wrapper scripts resolved: ``nvcc --dryrun``
  says where it runs from), else ``/usr/local/cuda``, ``/usr/local/cuda-*`` (torch's CUDA major
  version first), ``/opt/cuda``; a toolkit counts only if it has ``include/cuda_runtime.h``.
  (torch's own guess, the parent of ``nvcc``'s directory, fails for a ``/usr/local/bin/nvcc``
  wrapper with ``cuda_runtime.h: No such file or directory``.)
* ``MAX_JOBS``: parallel compile jobs (torch's BuildExtension honours it with ninja).
* ``DEBUG=1``: ``-O0 -g`` (and ``-G`` for device code).
* ``FASTMASK_LOCAL_VERSION=auto`` (set by ``scripts/build_wheel.sh``): a prebuilt wheel for the
  torch used at build time: the version gets a local tag naming it (``0.1.0+pt213cpu``,
  ``0.1.0+pt213cu130``), the torch requirement narrows to that minor release
  (``torch>=2.13,<2.14``), the wheel is tagged ``cp310-abi3`` (the library uses no Python API),
  and a build without the extension, or without the CUDA part next to a CUDA torch, fails instead
  of producing a wheel that lacks what its name promises. Any other value is used as the local
  tag as is. Unset: version ``0.1.0`` and ``torch>=2.7``.

torch must be importable at build time: install with ``pip install --no-build-isolation``
(scripts/setup.sh does), otherwise pip's isolated build environment pulls another torch and the
extension would be built against it. The torch version, CUDA version, archs and compiler used are
recorded in ``fastmask/_C_build.json`` beside the library; ``fastmask._ext`` refuses to load a
library built for another torch.
"""
import glob
import json
import os
import re
import shutil
import subprocess
import sys

from setuptools import find_packages, setup

HERE = os.path.dirname(os.path.abspath(__file__))
BUILD_INFO = "_C_build.json"

packages = find_packages(include=["fastmask", "fastmask.*"])
package_dir = {}
if os.path.isdir(os.path.join(HERE, "kernels")):
    packages.append("fastmask.kernels")
    package_dir["fastmask.kernels"] = "kernels"


def _env_flag(name: str) -> bool:
    return os.environ.get(name, "0").strip().lower() in ("1", "true", "yes", "on")


DEFAULT_CUDA_ARCHS = "80;90;100;120+PTX"


def _split_archs(raw: str) -> list[str]:
    return [a for a in raw.replace(",", ";").replace(" ", ";").split(";") if a]


def _arch_number(arch: str) -> int:
    return int(arch.replace("+PTX", "").replace(".", "").replace("sm_", "").replace("compute_", ""))


def _nvcc_archs(nvcc: str) -> set[int]:
    """Compute capabilities ``nvcc --list-gpu-arch`` supports (empty if it cannot say)."""
    try:
        out = subprocess.run([nvcc, "--list-gpu-arch"], capture_output=True, text=True, timeout=60).stdout
    except (OSError, subprocess.SubprocessError):
        return set()
    return {int(m) for m in re.findall(r"compute_(\d+)", out)}


def _cuda_archs(nvcc: str) -> list[str]:
    raw = os.environ.get("FASTMASK_CUDA_ARCHS", "").strip()
    if raw:
        return _split_archs(raw)  # as asked: nvcc reports an arch it does not know
    wanted = [a.replace("+PTX", "") for a in _split_archs(DEFAULT_CUDA_ARCHS)]
    supported = _nvcc_archs(nvcc)
    keep = [a for a in wanted if not supported or _arch_number(a) in supported]
    if not keep:
        keep = [str(max(supported))] if supported else wanted
    keep[-1] += "+PTX"
    return keep


def _has_cuda_runtime_header(home: str | None) -> bool:
    return bool(home) and os.path.isfile(os.path.join(home, "include", "cuda_runtime.h"))


def _nvcc_toolkit(nvcc: str) -> str | None:
    """The toolkit an ``nvcc`` command really runs from (through wrapper scripts): ``TOP`` in its
    ``--dryrun`` listing."""
    try:
        run = subprocess.run([nvcc, "--dryrun", "-c", "-x", "cu", os.devnull, "-o", os.devnull],
                             capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.SubprocessError):
        return None
    for line in (run.stdout + run.stderr).splitlines():
        m = re.match(r"#\$ TOP=(.+)$", line.strip())
        if m:
            return os.path.normpath(m.group(1).strip())
    return None


def find_cuda_home(torch_cuda: str | None = None) -> tuple[str | None, list[str]]:
    """(CUDA toolkit root with ``include/cuda_runtime.h`` and ``bin/nvcc``, or None; why each
    candidate was rejected)."""
    rejected = []
    explicit = os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH")
    if explicit:
        if _has_cuda_runtime_header(explicit):
            return explicit, rejected
        # an explicit choice is never second-guessed
        return None, [f"CUDA_HOME/CUDA_PATH={explicit} has no include/cuda_runtime.h"]
    nvcc = shutil.which("nvcc")
    if nvcc:
        real = os.path.realpath(nvcc)
        home = os.path.dirname(os.path.dirname(real))
        if _has_cuda_runtime_header(home):
            return home, rejected
        rejected.append(f"{home} (parent of nvcc {nvcc}" + (f" -> {real}" if real != nvcc else "") +
                        ") has no include/cuda_runtime.h")
        top = _nvcc_toolkit(nvcc)
        if top and _has_cuda_runtime_header(top):
            return top, rejected
        if top:
            rejected.append(f"{top} (where nvcc --dryrun says it runs from) has no include/cuda_runtime.h")
    major = (torch_cuda or "").split(".")[0]

    def rank(path):
        nums = [int(x) for x in re.findall(r"\d+", os.path.basename(path))]
        return (bool(nums) and str(nums[0]) == major, nums)

    versioned = sorted(glob.glob("/usr/local/cuda-*"), key=rank, reverse=True)
    for home in ["/usr/local/cuda", *versioned, "/opt/cuda"]:
        if _has_cuda_runtime_header(home) and os.path.isfile(os.path.join(home, "bin", "nvcc")):
            return home, rejected
        if os.path.exists(home):
            rejected.append(f"{home} has no include/cuda_runtime.h or bin/nvcc")
    return None, rejected


def _gencode_flags(archs: list[str]) -> list[str]:
    flags = []
    for a in archs:
        ptx = a.endswith("+PTX")
        num = a.replace("+PTX", "").replace(".", "").replace("sm_", "")
        flags.append(f"-gencode=arch=compute_{num},code=sm_{num}")
        if ptx:
            flags.append(f"-gencode=arch=compute_{num},code=compute_{num}")
    return flags


def _compiler_version(cmd: list[str]) -> str:
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=30).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    lines = out.splitlines()
    release = [line for line in lines if "release" in line]  # nvcc: "Cuda compilation tools, release 13.0, V13.0.88"
    return (release or lines or ["unknown"])[0]


def _extensions():
    """(ext_modules, cmdclass); empty when the extension is skipped or cannot be built."""
    if _env_flag("FASTMASK_SKIP_EXT"):
        print("fastmask: FASTMASK_SKIP_EXT=1, building without the C++/CUDA extension", file=sys.stderr)
        return [], {}
    try:
        import torch
    except ImportError:
        print("fastmask: torch is not importable at build time, building without the extension "
              "(install with --no-build-isolation)", file=sys.stderr)
        return [], {}
    cxx = os.environ.get("CXX", "c++")
    if shutil.which(cxx.split()[0]) is None:
        print(f"fastmask: no C++ compiler ({cxx}) found, building without the extension", file=sys.stderr)
        return [], {}

    debug = _env_flag("DEBUG")
    opt = ["-O0", "-g"] if debug else ["-O3"]
    # No -ffast-math: the kernels rely on IEEE order of operations (explicit fmas only) to match
    # the reference bit for bit. -fno-math-errno lets sqrt vectorize; it changes no result.
    cxx_flags = opt + ["-fopenmp", "-ffp-contract=off", "-fno-math-errno", "-fvisibility=hidden"]
    sources = sorted(glob.glob(os.path.join("csrc", "*.cpp")) + glob.glob(os.path.join("csrc", "cpu", "*.cpp")))

    with_cuda = not _env_flag("FASTMASK_SKIP_CUDA") and torch.version.cuda is not None
    cuda_home = None
    if with_cuda:
        cuda_home, rejected = find_cuda_home(torch.version.cuda)
        if cuda_home is None or not os.path.isfile(os.path.join(cuda_home, "bin", "nvcc")):
            print(f"fastmask: torch {torch.__version__} has CUDA {torch.version.cuda}, but no CUDA toolkit "
                  "(include/cuda_runtime.h and bin/nvcc) was found"
                  + ("".join(f"\n  - {r}" for r in rejected) if rejected else " (no nvcc on PATH, no /usr/local/cuda)")
                  + "\n  building the C++ kernels only; set CUDA_HOME to the toolkit root to build the CUDA kernels "
                  "(or FASTMASK_SKIP_CUDA=1 to silence this)", file=sys.stderr)
            with_cuda = False
        else:
            # torch.utils.cpp_extension guesses CUDA_HOME when first imported (the parent of nvcc's
            # directory: wrong for a wrapper script): give it this one, before and after import.
            os.environ["CUDA_HOME"] = cuda_home
    from torch.utils import cpp_extension

    if with_cuda:
        cpp_extension.CUDA_HOME = cuda_home
    nvcc_path = os.path.join(cuda_home, "bin", "nvcc") if with_cuda else None
    archs = _cuda_archs(nvcc_path) if with_cuda else []
    extra = {"cxx": cxx_flags}
    define_macros = []
    if with_cuda:
        sources += sorted(glob.glob(os.path.join("csrc", "cuda", "*.cu")) + glob.glob(os.path.join("csrc", "cuda", "*.cpp")))
        extra["nvcc"] = (["-O0", "-g", "-G"] if debug else ["-O3", "-lineinfo"]) + [
            "-fmad=false", "--expt-relaxed-constexpr",
        ] + _gencode_flags(archs)
        define_macros.append(("FASTMASK_WITH_CUDA", "1"))
        ext_cls = cpp_extension.CUDAExtension
    else:
        ext_cls = cpp_extension.CppExtension
    ext = ext_cls(
        name="fastmask._C",
        sources=sources,
        include_dirs=[os.path.join(HERE, "csrc")],
        extra_compile_args=extra,
        extra_link_args=["-fopenmp"],
        define_macros=define_macros,
        py_limited_api=True,  # no Python.h, no libtorch_python: loaded with torch.ops.load_library
    )

    info = {
        "torch": torch.__version__,
        "torch_git": getattr(torch.version, "git_version", None),
        "cuda": torch.version.cuda if with_cuda else None,
        "cuda_archs": archs,
        "cxx": _compiler_version([cxx.split()[0], "--version"]),
        "nvcc": _compiler_version([nvcc_path, "--version"]) if with_cuda else None,
        "cuda_home": cuda_home,
        "cxx11_abi": bool(torch._C._GLIBCXX_USE_CXX11_ABI),
        "debug": debug,
        "python": sys.version.split()[0],
    }

    class BuildExt(cpp_extension.BuildExtension):
        """torch's BuildExtension (ninja, MAX_JOBS), plus the build record beside the library."""

        def run(self):
            super().run()
            text = json.dumps(info, indent=2) + "\n"
            targets = {os.path.dirname(self.get_ext_fullpath("fastmask._C"))}
            if self.inplace or getattr(self, "editable_mode", False):
                targets.add(os.path.join(HERE, "fastmask"))
            for d in targets:
                os.makedirs(d, exist_ok=True)
                with open(os.path.join(d, BUILD_INFO), "w") as f:
                    f.write(text)

    print(f"fastmask: building the extension (CUDA: {'archs ' + ','.join(archs) if with_cuda else 'no'})", file=sys.stderr)
    return [ext], {"build_ext": BuildExt.with_options(no_python_abi_suffix=True)}


def _local_version(ext_modules) -> tuple[str | None, list[str]]:
    """(local version tag, torch requirement) for a prebuilt wheel; (None, ["torch>=2.7"]) unless
    FASTMASK_LOCAL_VERSION is set."""
    mode = os.environ.get("FASTMASK_LOCAL_VERSION", "").strip()
    if not mode:
        return None, ["torch>=2.7"]
    import torch

    major, minor = (int(x) for x in re.match(r"(\d+)\.(\d+)", torch.__version__).groups())
    requires = [f"torch>={major}.{minor},<{major}.{minor + 1}"]
    if mode != "auto":
        return mode, requires
    if not ext_modules:
        sys.exit("fastmask: FASTMASK_LOCAL_VERSION=auto builds a prebuilt wheel, but the extension is not "
                 "being built (see the message above)")
    cuda = torch.version.cuda
    if cuda and "FASTMASK_WITH_CUDA" not in dict(ext_modules[0].define_macros) and not _env_flag("FASTMASK_SKIP_CUDA"):
        sys.exit(f"fastmask: torch {torch.__version__} has CUDA {cuda} but the CUDA kernels are not being built "
                 "(nvcc not found?); set FASTMASK_SKIP_CUDA=1 to build a wheel with the CPU kernels only")
    return f"pt{major}{minor}" + ("cu" + cuda.replace(".", "") if cuda else "cpu"), requires


def _version() -> str:
    with open(os.path.join(HERE, "fastmask", "_version.py")) as f:
        return re.search(r"__version__\s*=\s*[\"']([^\"']+)", f.read()).group(1)


ext_modules, cmdclass = _extensions()
local, torch_requires = _local_version(ext_modules)
setup(version=_version() + (f"+{local}" if local else ""),
      install_requires=torch_requires + ["numpy", "safetensors>=0.4", "tqdm"],
      packages=packages, package_dir=package_dir, ext_modules=ext_modules, cmdclass=cmdclass,
      package_data={"fastmask": [BUILD_INFO]},
      options={"bdist_wheel": {"py_limited_api": "cp310"}} if local and ext_modules else {})

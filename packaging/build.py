"""``python packaging/build.py``: the whole appliance as one file, ``dist/appliance-<version>-<os>-<arch>``.

The file runs where no Python is installed: the GGUF engine, onnxruntime, the desktop app and the
default model are inside. Four steps, each printed with its time:

1. **llama.cpp, portable.** pip compiles llama.cpp for the build machine's CPU, and that library
   dies with "illegal instruction" on an older one. Here the same sources (the llama-cpp-python
   sdist of the installed version: the Python bindings must match the library exactly) are built
   with ``GGML_BACKEND_DL``: libllama and libggml without any CPU code, plus one CPU library per
   instruction-set level (``VARIANTS``). ``engines/cpu_backends.py`` loads the best one at start-up.
   Two CMake trees, because ggml's "all variants" switch builds fourteen of them and libggml
   depends on every one: tree A builds libllama with no CPU backend, tree B only the variants we
   ship. Cached in ``--cache-dir`` by version, variants, compiler and flags.
2. **PyInstaller, onedir** (``packaging/appliance.spec``), then the portable llama.cpp libraries
   replace the pip build's in the folder.
3. **One file.** ``packaging/launcher`` (C) is compiled and the folder is packed behind it
   (``payload.py``): the launcher unpacks it once into a cache folder keyed by the build's hash and
   then only execs it, so a start costs what the onedir program costs.
4. **A report**: the file's size, the size without the model, the largest parts, written beside
   the file as ``<name>.build.json`` and printed.

``--cuda`` builds a separate ``-cuda`` file whose llama.cpp also has ggml's CUDA backend (needs
nvcc; CPU users never download it). Build machine needs: a C/C++ compiler, CMake >= 3.21, zlib
headers, and the package index for the llama-cpp-python sdist (or it already in the cache).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import shutil
import subprocess
import sys
import tarfile
import time
from collections.abc import Sequence
from pathlib import Path

import payload  # packaging/payload.py: this script's own folder is first on sys.path

ROOT = Path(__file__).resolve().parent.parent
SPEC = ROOT / "packaging" / "appliance.spec"
ENTRY = ROOT / "packaging" / "entry.py"
# The x86-64 CPU variants shipped: AVX2 (2013+) is the floor; then AVX-VNNI (Intel client 12th gen+),
# AVX-512 (Skylake-X), AVX-512 VBMI/VNNI (Ice Lake), AVX-512 BF16 (AMD Zen 4/5), AMX (Sapphire Rapids+).
VARIANTS = ("haswell", "alderlake", "skylakex", "icelake", "zen4", "sapphirerapids")
CMAKE_COMMON = (
    "-DCMAKE_BUILD_TYPE=Release",
    "-DBUILD_SHARED_LIBS=ON",
    "-DGGML_BACKEND_DL=ON",
    "-DGGML_NATIVE=OFF",
    "-DLLAMA_CURL=OFF",
    "-DLLAMA_OPENSSL=OFF",
    "-DLLAMA_BUILD_TESTS=OFF",
    "-DLLAMA_BUILD_EXAMPLES=OFF",
    "-DLLAMA_BUILD_TOOLS=OFF",
    "-DLLAMA_BUILD_SERVER=OFF",
    "-DLLAMA_BUILD_COMMON=OFF",
    # every library finds its siblings in its own folder, never in the build tree that made it
    "-DCMAKE_BUILD_WITH_INSTALL_RPATH=ON",
    "-DCMAKE_INSTALL_RPATH=$ORIGIN",
)
MODEL_SUFFIXES = (".gguf", ".onnx")  # stored as they are, and left out of the "without the model" size


class BuildError(RuntimeError):
    """A step failed; the message says which and what to do."""


def _step(title: str) -> float:
    print(f"==> {title}", flush=True)
    return time.perf_counter()


def _done(start: float, what: str = "") -> None:
    print(f"    done in {time.perf_counter() - start:.1f} s{': ' + what if what else ''}", flush=True)


def _run(cmd: Sequence[str | Path], log: Path | None = None, **kw: object) -> None:
    """Run a command; on failure show the end of its output (the whole of it is in ``log``)."""
    args = [str(c) for c in cmd]
    if log is None:
        result = subprocess.run(args, check=False, **kw)  # type: ignore[call-overload]
        if result.returncode:
            raise BuildError(f"{' '.join(args[:3])}... failed with status {result.returncode}")
        return
    with log.open("w") as out:
        result = subprocess.run(args, stdout=out, stderr=subprocess.STDOUT, check=False, **kw)  # type: ignore[call-overload]
    if result.returncode:
        tail = "\n".join(log.read_text(errors="replace").splitlines()[-30:])
        raise BuildError(f"{' '.join(args[:3])}... failed with status {result.returncode} (log {log}):\n{tail}")


def _installed_version(dist: str) -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(dist)
    except PackageNotFoundError as exc:
        raise BuildError(f"{dist} is not installed here: pip install -e '.[gui]' first") from exc


def _compiler_id() -> str:
    cc = os.environ.get("CC", "cc")
    try:
        return subprocess.run([cc, "--version"], capture_output=True, text=True, check=True).stdout.splitlines()[0]
    except (OSError, subprocess.CalledProcessError, IndexError) as exc:
        raise BuildError(f"no C compiler ({cc}): the portable llama.cpp and the launcher need one") from exc


def _sdist(version: str, cache: Path) -> Path:
    """The llama-cpp-python sdist of ``version``: the cache's, or from the package index."""
    found = sorted((cache / "sdist").glob(f"llama_cpp_python-{version}.tar.gz"))
    if found:
        return found[0]
    (cache / "sdist").mkdir(parents=True, exist_ok=True)
    pip = [sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--no-binary", ":all:"]
    _run([*pip, "--dest", cache / "sdist", f"llama-cpp-python=={version}"])
    found = sorted((cache / "sdist").glob(f"llama_cpp_python-{version}.tar.gz"))
    if not found:
        raise BuildError(f"pip did not download the llama-cpp-python {version} sdist")
    return found[0]


def build_llama(version: str, cache: Path, jobs: int, cuda: bool) -> Path:
    """The portable llama.cpp libraries for llama-cpp-python ``version``: a folder to put in ``llama_cpp/lib``."""
    flags = [*CMAKE_COMMON, *(["-DGGML_CUDA=ON"] if cuda else [])]
    key = hashlib.sha256(json.dumps([version, VARIANTS, flags, _compiler_id()]).encode()).hexdigest()[:12]
    out = cache / f"llama-{version}-{key}"
    lib = out / "lib"
    if (lib / ".complete").exists():
        print(f"    cached: {lib}")
        return lib
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    with tarfile.open(_sdist(version, cache)) as tar:
        tar.extractall(out / "src", filter="data")
    src = next((out / "src").glob("llama_cpp_python-*")) / "vendor" / "llama.cpp"
    tree_a, tree_b = out / "build-llama", out / "build-cpu"
    targets_a = ["llama", *(["ggml-cuda"] if cuda else [])]
    _run(["cmake", "-S", src, "-B", tree_a, *flags, "-DGGML_CPU=OFF"], out / "configure-llama.log")
    _run(["cmake", "-S", src, "-B", tree_b, *flags, "-DGGML_CPU_ALL_VARIANTS=ON"], out / "configure-cpu.log")
    targets_b = [f"ggml-cpu-{v}" for v in VARIANTS]
    _run(["cmake", "--build", tree_b, f"-j{jobs}", "--target", *targets_b], out / "build-cpu.log")
    _run(["cmake", "--build", tree_a, f"-j{jobs}", "--target", *targets_a], out / "build-llama.log")
    lib.mkdir()
    for stem in ("llama", "ggml", "ggml-base", *(["ggml-cuda"] if cuda else [])):
        _one_library(tree_a / "bin", stem, lib)
    for variant in VARIANTS:
        shutil.copy2(tree_b / "bin" / f"libggml-cpu-{variant}.so", lib)
    if cuda:
        copy_cuda_runtime(lib / "libggml-cuda.so", lib)
    (lib / ".complete").write_text(key)
    return lib


def copy_cuda_runtime(backend: Path, lib: Path) -> None:
    """The CUDA toolkit's libraries that ggml's CUDA backend links (cudart, cublas, cublasLt), beside it:
    the target needs only the NVIDIA driver. libcuda itself is the driver's and is never carried."""
    out = subprocess.run(["ldd", str(backend)], capture_output=True, text=True, check=False).stdout
    for line in out.splitlines():
        name, _, rest = line.strip().partition(" => ")
        path = Path(rest.split(" (")[0]) if rest else None
        if path and path.is_file() and name.startswith(("libcudart", "libcublas")):
            shutil.copy2(path.resolve(), lib / name)


def _one_library(bin_dir: Path, stem: str, lib: Path) -> None:
    """Copy ``lib<stem>.so`` as one real file, and its versioned names (the SONAMEs the others
    link against) as symlinks to it: two copies of libggml in one process would mean two backend
    registries."""
    plain = bin_dir / f"lib{stem}.so"
    shutil.copy2(plain.resolve(), lib / plain.name)
    for alias in sorted(bin_dir.glob(f"lib{stem}.so.*")):
        (lib / alias.name).symlink_to(plain.name)


def run_pyinstaller(work: Path, name: str, with_model: bool) -> Path:
    """The onedir folder, built from ``appliance.spec``."""
    env = dict(
        os.environ,
        APPLIANCE_BUILD_ENTRY=str(ENTRY),
        APPLIANCE_BUILD_ROOT=str(ROOT),
        APPLIANCE_BUILD_NAME=name,
        APPLIANCE_BUILD_MODEL="1" if with_model else "0",
    )
    log = work / "pyinstaller.log"
    work.mkdir(parents=True, exist_ok=True)
    folders = ["--distpath", work / "dist", "--workpath", work / "build"]
    _run(
        [sys.executable, "-m", "PyInstaller", SPEC, "--noconfirm", "--log-level", "WARN", *folders],
        log,
        env=env,
        cwd=ROOT,
    )
    return work / "dist" / name


def place_llama(onedir: Path, llama_lib: Path) -> None:
    """Put the portable llama.cpp libraries where llama-cpp-python looks: ``llama_cpp/lib``."""
    target = onedir / "_internal" / "llama_cpp" / "lib"
    shutil.rmtree(target, ignore_errors=True)
    target.mkdir(parents=True)
    for item in llama_lib.iterdir():
        if item.name.startswith("."):
            continue
        if item.is_symlink():
            (target / item.name).symlink_to(os.readlink(item))
        else:
            shutil.copy2(item, target / item.name)
            subprocess.run(["strip", "--strip-unneeded", str(target / item.name)], check=False)


def _needed(path: Path) -> list[str]:
    """The DT_NEEDED names of an ELF file (readelf comes with the compiler toolchain)."""
    out = subprocess.run(["readelf", "-d", str(path)], capture_output=True, text=True, check=False).stdout
    return [line.split("[", 1)[1].rstrip("]") for line in out.splitlines() if "(NEEDED)" in line]


def _is_elf(path: Path) -> bool:
    with path.open("rb") as fh:
        return fh.read(4) == b"\x7fELF"


def prune_libraries(onedir: Path) -> list[str]:
    """Remove the top-level shared libraries that nothing in the folder links against.

    PyInstaller collects each library's dependencies when it analyses it, so libraries needed only
    by something dropped afterwards (the GTK theme plugin, the pip build of llama.cpp) stay behind.
    Roots are every ELF file but the top-level ``lib*.so*`` (extension modules, plugins, the
    ctypes-loaded llama.cpp and onnxruntime libraries, the program), and libpython, which the
    bootloader opens by name. Linux only: elsewhere nothing is pruned.
    """
    internal = onedir / "_internal"
    if not sys.platform.startswith("linux") or shutil.which("readelf") is None:
        return []
    top = {p.name: p for p in internal.iterdir() if p.name.startswith("lib") and ".so" in p.name and p.is_file()}
    roots = [onedir / "appliance", *(p for p in internal.glob("libpython*"))]
    roots += [p for p in internal.rglob("*") if p.is_file() and not p.is_symlink() and p.parent != internal]
    roots += [p for p in internal.iterdir() if p.is_file() and p.name not in top]
    seen: set[str] = set()
    stack = [p for p in roots if _is_elf(p)]
    while stack:
        for name in _needed(stack.pop()):
            if name in top and name not in seen:
                seen.add(name)
                stack.append(top[name])
    removed = [n for n in top if n not in seen and not n.startswith("libpython")]
    for name in removed:
        top[name].unlink()
    return sorted(removed)


def strip_python(onedir: Path) -> None:
    """Strip libpython's symbol table (a pyenv build keeps it: ~20 MB). Not everything is stripped:
    wheels' own libraries are stripped already, and stripping auditwheel-repaired ones (numpy's
    OpenBLAS) breaks them ("ELF load command address/offset not page-aligned")."""
    if shutil.which("strip") is None:
        return
    for lib in (onedir / "_internal").glob("libpython*.so*"):
        if not lib.is_symlink():
            subprocess.run(["strip", "--strip-unneeded", str(lib)], check=False)


def platform_tag() -> str:
    machine = platform.machine().lower().replace("amd64", "x86_64")
    return f"{sys.platform.removesuffix('2')}-{machine}".replace("darwin", "macos").replace("win32", "windows")


def report(out: Path, packed: payload.PackReport) -> dict[str, object]:
    """Sizes for BENCHMARKS.md: the file, without the model, unpacked, and the largest parts grouped
    by package (what a reader can act on) rather than by file."""
    groups: dict[str, list[int]] = {}
    model = 0
    for entry in packed.entries:
        parts = Path(entry.path).parts
        inner = parts[1:] if parts[:1] == ("_internal",) else parts
        key = "/".join(inner[:2]) if inner[:1] in (("PySide6",), ("numpy",)) else (inner[0] if inner else entry.path)
        if Path(entry.path).suffix in MODEL_SUFFIXES:
            model += entry.compressed_size
            key = f"model: {Path(entry.path).name}"
        sizes = groups.setdefault(key, [0, 0])
        sizes[0] += entry.compressed_size
        sizes[1] += entry.original_size
    largest = sorted(groups.items(), key=lambda kv: -kv[1][0])[:15]
    size, without = packed.file_size, packed.file_size - model
    data: dict[str, object] = {
        "file": str(out),
        "build_id": packed.build_id,
        "size_bytes": size,
        "size_without_model_bytes": without,
        "unpacked_bytes": packed.unpacked_size,
        "files": len(packed.entries),
        "largest_parts": [{"part": k, "packed_bytes": v[0], "unpacked_bytes": v[1]} for k, v in largest],
    }
    mb = 1e6
    print(f"    {out.name}: {size / mb:.1f} MB ({without / mb:.1f} MB without the model)")
    print(f"    unpacks once to {packed.unpacked_size / mb:.1f} MB in {len(packed.entries)} files; largest parts:")
    for k, v in largest:
        print(f"      {v[0] / mb:7.1f} MB packed  {v[1] / mb:7.1f} MB unpacked  {k}")
    return data


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="packaging/build.py", description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=ROOT / "dist", help="where the file goes (default: dist/)")
    parser.add_argument(
        "--cache-dir",
        type=Path,
        default=Path(os.environ.get("APPLIANCE_BUILD_CACHE", Path.home() / ".cache" / "appliance-build")),
        help="kept between builds: the llama.cpp sdist and portable libraries (env APPLIANCE_BUILD_CACHE)",
    )
    parser.add_argument("--jobs", "-j", type=int, default=os.cpu_count() or 2, help="parallel compile jobs")
    parser.add_argument("--cuda", action="store_true", help="a separate -cuda file with llama.cpp's CUDA backend")
    parser.add_argument("--no-model", action="store_true", help="leave the default model out (a -nomodel file)")
    args = parser.parse_args(argv)
    from appliance import __version__

    suffix = ("-cuda" if args.cuda else "") + ("-nomodel" if args.no_model else "")
    name = f"appliance-{__version__}-{platform_tag()}{suffix}"
    work = args.cache_dir / "work" / name
    try:
        t = _step("llama.cpp, portable: " + ", ".join(VARIANTS) + (" + CUDA" if args.cuda else ""))
        llama_lib = build_llama(_installed_version("llama-cpp-python"), args.cache_dir, args.jobs, args.cuda)
        _done(t)
        t = _step("PyInstaller, onedir")
        onedir = run_pyinstaller(work, "appliance", with_model=not args.no_model)
        place_llama(onedir, llama_lib)
        pruned = prune_libraries(onedir)
        strip_python(onedir)
        _done(t, f"{onedir}; {len(pruned)} unneeded libraries removed")
        t = _step("one file: launcher + payload")
        launcher = payload.compile_launcher(work / "launcher")
        args.out.mkdir(parents=True, exist_ok=True)
        out = args.out / name
        packed = payload.pack(onedir, "appliance", launcher, out, stored_suffixes=MODEL_SUFFIXES)
        _done(t, str(out))
        data = report(out, packed)
        out.with_name(out.name + ".build.json").write_text(json.dumps(data, indent=2) + "\n")
    except BuildError as exc:
        print(f"build.py: error: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

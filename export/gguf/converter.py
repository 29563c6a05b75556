"""llama.cpp's own HF -> GGUF converter, obtained at export time and run as a subprocess.

No llama.cpp code lives in this repository. The converter that matches the installed llama-cpp-python
is the one in that version's sdist (`vendor/llama.cpp/convert_hf_to_gguf.py`, its `conversion/` package
and `gguf-py`): a GGUF written by a newer or older converter may carry keys or tensor layouts the
installed libllama does not read. We take it from, in order:

1. `--llama-cpp DIR`: a llama.cpp checkout the user points at (they own the version match);
2. the cache `$XDG_CACHE_HOME/sparc-engine/llama-cpp-python-<version>/` from an earlier export;
3. `pip download --no-deps --no-binary :all: llama-cpp-python==<installed version>`, of which only the
   converter files are extracted into that cache (the rest of the 77 MB sdist is dropped).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
from collections import deque
from importlib import metadata
from pathlib import Path

from engine.errors import UserError

CONVERTER = "convert_hf_to_gguf.py"
# what the converter needs from a llama.cpp tree: itself, its per-architecture package, its own copy of
# the gguf library (newer than the registry's, and the one its constants match) and chat templates
NEEDED = (CONVERTER, "conversion/", "gguf-py/", "models/templates/")
SHIM = Path(__file__).with_name("_convert_shim.py")


def llama_cpp_python_version() -> str | None:
    try:
        return metadata.version("llama-cpp-python")
    except metadata.PackageNotFoundError:
        return None


def _cache_root() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "sparc-engine"


def _extract_converter(sdist: Path, dest: Path) -> None:
    """Copy the NEEDED paths from `<name>/vendor/llama.cpp/` inside the sdist into `dest`."""
    with tarfile.open(sdist) as archive:
        members = []
        for member in archive.getmembers():
            parts = member.name.split("/", 3)  # <name>-<version>, vendor, llama.cpp, rest
            if len(parts) == 4 and parts[1:3] == ["vendor", "llama.cpp"] and parts[3].startswith(NEEDED):
                member.name = parts[3]
                members.append(member)
        if not any(m.name == CONVERTER for m in members):
            raise UserError(f"{sdist.name} has no vendor/llama.cpp/{CONVERTER}")
        archive.extractall(dest, members=members, filter="data")


def _download_converter(version: str, log) -> Path:
    dest = _cache_root() / f"llama-cpp-python-{version}"
    if (dest / CONVERTER).is_file():
        return dest
    log(f"downloading the llama-cpp-python {version} sdist for its converter (once; cached in {dest})")
    with tempfile.TemporaryDirectory(prefix="sparc-llama-sdist-") as tmp:
        command = [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:"]
        command += ["-q", "-d", tmp, f"llama-cpp-python=={version}"]
        done = subprocess.run(command, capture_output=True, text=True)
        sdists = list(Path(tmp).glob("llama_cpp_python-*.tar.gz"))
        if done.returncode != 0 or not sdists:
            reason = (done.stderr.strip().splitlines() or ["pip gave no reason"])[-1]
            raise UserError(
                f"could not download the llama-cpp-python {version} sdist ({reason}); "
                "pass --llama-cpp DIR with a llama.cpp checkout instead"
            )
        dest.parent.mkdir(parents=True, exist_ok=True)
        pending = Path(tempfile.mkdtemp(prefix=dest.name + ".", dir=dest.parent))
        _extract_converter(sdists[0], pending)
    # rename into place last, so a killed download never leaves a half-extracted cache behind
    if dest.exists():
        shutil.rmtree(pending)
    else:
        pending.rename(dest)
    return dest


def find_converter(llama_cpp_dir: Path | None, log) -> tuple[Path, str]:
    """The llama.cpp directory holding the converter, and a description of where it came from."""
    if llama_cpp_dir is not None:
        if not (llama_cpp_dir / CONVERTER).is_file():
            raise UserError(f"--llama-cpp {llama_cpp_dir}: no {CONVERTER} there (give a llama.cpp checkout)")
        return llama_cpp_dir, f"llama.cpp checkout {llama_cpp_dir}"
    version = llama_cpp_python_version()
    if version is None:
        raise UserError(
            "GGUF export needs llama.cpp's converter: install the runtime it must match "
            "(pip install 'sparc-engine[llama]') or pass --llama-cpp DIR with a llama.cpp checkout"
        )
    return _download_converter(version, log), f"llama-cpp-python {version} sdist"


def run_converter(
    llama_cpp_dir: Path,
    model_dir: Path,
    outfile: Path,
    outtype: str,
    *,
    mmproj: bool = False,
    pre_tokenizer_fallback: str | None = None,
) -> None:
    """Run `convert_hf_to_gguf.py` (through our shim) in a subprocess, counting the tensors it converts."""
    command = [sys.executable, str(SHIM), str(llama_cpp_dir), pre_tokenizer_fallback or "-"]
    command += [str(model_dir), "--outfile", str(outfile), "--outtype", outtype]
    command += ["--mmproj"] if mmproj else []
    last_lines: deque[str] = deque(maxlen=12)  # for the error message; the full log is one line per tensor
    tensors = 0
    show = sys.stderr.isatty()
    with subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) as process:
        assert process.stdout is not None
        for line in process.stdout:
            last_lines.append(line.rstrip())
            if " --> " in line:  # the converter logs "name, dtype --> type, shape" per tensor
                tensors += 1
                if show:
                    print(f"\r    {tensors} tensors", end="", file=sys.stderr, flush=True)
    if show and tensors:
        print(file=sys.stderr)
    if process.returncode != 0 or not outfile.is_file():
        raise UserError(f"the llama.cpp converter failed on {model_dir}:\n" + "\n".join(last_lines))

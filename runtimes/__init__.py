"""Runtimes: one module per inference library, all behind the protocol in runtimes/protocol.py.

The registry names each runtime's module lazily, so opening an ONNX bundle never imports torch.
"""

from __future__ import annotations

import importlib
import inspect
from pathlib import Path

from runtimes.protocol import Runtime, RuntimeInputError

# name -> (module:class, the extra that installs what it needs)
RUNTIMES: dict[str, tuple[str, str]] = {
    "torch_ref": ("runtimes.torch_ref:TorchRefRuntime", "export"),
    "onnx": ("runtimes.onnx:OnnxRuntime", "onnx"),
    "llamacpp": ("runtimes.llamacpp:LlamaCppRuntime", "llama"),
}


def open_runtime(name: str, bundle: str | Path, device: str = "auto", **options: object) -> Runtime:
    if name not in RUNTIMES:
        raise RuntimeInputError(f"unknown runtime {name!r} (have: {', '.join(sorted(RUNTIMES))})")
    target, extra = RUNTIMES[name]
    module_name, class_name = target.split(":")
    try:
        module = importlib.import_module(module_name)
    except ImportError as error:
        raise RuntimeInputError(
            f"runtime {name!r} needs {error.name or 'a missing package'}: pip install 'sparc-engine[{extra}]'"
        ) from error
    if not Path(bundle).exists():
        raise RuntimeInputError(f"model.bundle {str(bundle)!r} does not exist")
    runtime_class = getattr(module, class_name)
    # the first parameter is the bundle; the rest but device are the runtime's own options
    accepted = [p for p in list(inspect.signature(runtime_class).parameters)[1:] if p != "device"]
    unknown = sorted(set(options) - set(accepted))
    if unknown:
        raise RuntimeInputError(
            f"runtime {name!r} takes no option {', '.join(unknown)} (it takes: {', '.join(accepted) or 'none'})"
        )
    return runtime_class(bundle, device=device, **options)

"""The llama.cpp runtime: GGUF bundles (export/gguf) through llama-cpp-python's low-level API.

`runtime.py` drives libllama and libmtmd (sequences, prefix forks, batched rollouts); an architecture
libmtmd cannot run brings an `ImagePath` (`family.py`), one module per family (`molmo2.py`), registered on
import.
"""

from runtimes.llamacpp import molmo2  # noqa: F401  (registers itself)
from runtimes.llamacpp.runtime import LlamaCppRuntime, image_rgb, quiet_llama_logs

__all__ = ["LlamaCppRuntime", "image_rgb", "quiet_llama_logs"]

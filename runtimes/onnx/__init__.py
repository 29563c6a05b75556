"""The onnxruntime runtime: ONNX bundles (export/onnx) on numpy and tokenizers, no torch.

`runtime.py` drives any bundle (sessions, the embed graph, the KV cache, prefix forks, batched decoding);
`session.py` wraps onnxruntime's sessions; what differs between architectures sits in one
`OnnxRuntimeFamily` (`family.py`) per module (`qwen3vl.py`, `molmo2.py`), registered on import.
"""

from runtimes.onnx import molmo2, qwen3vl  # noqa: F401  (each registers itself)
from runtimes.onnx.runtime import OnnxRuntime

__all__ = ["OnnxRuntime"]

"""The transformers reference runtime: the correctness oracle every other runtime is compared against.

`runtime.py` drives any checkpoint (KV, prefix forks, batched decoding); what differs between
architectures sits in one `TorchFamily` per module (`qwen3vl.py`, `molmo2.py`), registered on import.
The only place on the run side that imports torch and transformers.
"""

from runtimes.torch_ref import molmo2, qwen3vl  # noqa: F401  (each registers itself)
from runtimes.torch_ref.checkpoint import checkpoint_image_config
from runtimes.torch_ref.runtime import TorchRefRuntime

__all__ = ["TorchRefRuntime", "checkpoint_image_config"]

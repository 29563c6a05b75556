"""onnxruntime sessions for a bundle: execution-provider choice and the decoder's KV handling per device.

On CPU the past/present KV tensors are numpy arrays. On CUDA the decoder runs with IO binding: the present
KV stays on the GPU as OrtValues and is bound as the next step's past, so a decode step copies only the new
token's embedding in and one row of logits out.

Forking a prompt into n sequences copies nothing: the decoder graph takes a shared prefix KV (batch 1)
besides each sequence's own past (export/onnx/base.py), so the prompt's KV becomes the prefix of all n
rollouts and their own past starts empty. A decode step then grows only the rollouts' own KV (at most
max_new_tokens long); the prompt's KV is read in place on every step, on the host or on the GPU. Bundles
exported before the decoder had a prefix input fork by repeating the KV n times, as they always did.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort

from runtimes.bundle import PREFIX_KV
from runtimes.protocol import RuntimeInputError

CUDA = "CUDAExecutionProvider"
CPU = "CPUExecutionProvider"


def pick_providers(device: str) -> list[str]:
    """auto: CUDA when this onnxruntime build has it, else CPU; cuda: refuse a build without it."""
    has_cuda = CUDA in ort.get_available_providers()
    if device == "cuda" and not has_cuda:
        raise RuntimeInputError(
            "device: cuda was asked for but this onnxruntime has no CUDA execution provider "
            "(pip install 'sparc-engine[onnx-gpu]')"
        )
    if device not in ("auto", "cpu", "cuda"):
        raise RuntimeInputError(f"unknown device {device!r} (auto, cpu or cuda)")
    return [CUDA, CPU] if device == "cuda" or (device == "auto" and has_cuda) else [CPU]


def open_session(path: Path, providers: Sequence[str]) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.log_severity_level = 3  # errors only: ORT's provider-fallback warnings are not the user's concern
    try:
        return ort.InferenceSession(str(path), options, providers=list(providers))
    except Exception as error:  # ORT raises its own exception types for malformed graphs
        raise RuntimeInputError(
            f"{path}: onnxruntime cannot load it ({' '.join(str(error).split())})"
        ) from None


Past = list[Any]  # per layer key, value: np.ndarray (CPU) or OrtValue on the GPU (CUDA)


class DecoderSession:
    """The decoder graph: host inputs + past KV in, last-position logits (float32 numpy) + present KV out."""

    def __init__(
        self,
        session: ort.InferenceSession,
        kv_shape: tuple[int, int],
        dtype: np.dtype,
        bind_device: str | None = None,
    ) -> None:
        self.session = session
        self.kv_heads, self.head_dim = kv_shape
        self.dtype = dtype
        self.past_names = [i.name for i in session.get_inputs() if i.name.startswith("past_key_values.")]
        self.prefix_names = [i.name for i in session.get_inputs() if i.name.startswith(f"{PREFIX_KV}.")]
        self.present_names = [o.name for o in session.get_outputs() if o.name.startswith("present.")]
        # IO binding when the graph runs on the GPU (KV stays there); on CPU plain numpy in/out is as fast.
        # bind_device="cpu" forces the binding path on CPU, so tests without a GPU exercise it too.
        self.bind_device = bind_device or ("cuda" if session.get_providers()[0] == CUDA else None)

    def empty(self, batch: int) -> Past:
        """Past KV of length 0, for a prompt's first forward."""
        zeros = np.zeros((batch, self.kv_heads, 0, self.head_dim), self.dtype)  # (B, n_kv_heads, 0, head_dim)
        return [zeros] * len(self.past_names)

    def __call__(
        self, inputs: dict[str, np.ndarray], past: Past, prefix: Past | None = None
    ) -> tuple[np.ndarray, Past]:
        """Run the graph on the sequences' own `past` and the shared `prefix` (batch 1; None: empty)."""
        kv = dict(zip(self.past_names, past))
        if self.prefix_names:
            kv |= dict(zip(self.prefix_names, prefix if prefix is not None else self.empty(1)))
        if self.bind_device is None:
            outputs = self.session.run(None, {**inputs, **kv})
            return outputs[0].astype(np.float32, copy=False), outputs[1:]
        binding = self.session.io_binding()
        for name, array in inputs.items():
            binding.bind_cpu_input(name, np.ascontiguousarray(array))  # binding reads the raw buffer
        for name, value in kv.items():
            if isinstance(value, np.ndarray):  # an empty past starts on the host
                binding.bind_cpu_input(name, np.ascontiguousarray(value))
            else:
                binding.bind_ortvalue_input(name, value)
        binding.bind_output("logits", "cpu")
        for name in self.present_names:
            binding.bind_output(name, self.bind_device)
        self.session.run_with_iobinding(binding)
        outputs = binding.get_outputs()
        return outputs[0].numpy().astype(np.float32, copy=False), list(outputs[1:])

    def fork(self, past: Past, n: int) -> tuple[Past, Past | None]:
        """n sequences continuing a batch-1 KV: (their own past, the shared prefix to pass every step).

        With a prefix input the KV itself becomes the prefix, by reference, and the own past is empty; an
        older graph gets the KV repeated n times as its past and no prefix. The input KV is never written.
        """
        if self.prefix_names:
            return self.empty(n), list(past)
        if n == 1:
            return list(past), None
        if self.bind_device is None:
            return [np.repeat(value, n, axis=0) for value in past], None
        host = (value if isinstance(value, np.ndarray) else value.numpy() for value in past)
        return [
            ort.OrtValue.ortvalue_from_numpy(np.repeat(v, n, axis=0), self.bind_device, 0) for v in host
        ], None

"""onnxruntime sessions for a bundle: execution-provider choice and the decoder's KV handling per device.

The decoder graph (export/onnx/base.py) takes a shared prefix KV (batch 1) besides each sequence's own KV,
so the n rollouts of a prompt all read its KV in place, one copy, on the host or on the GPU.

Their own KV is a buffer allocated once per `generate` with room for the suffix and every new token; when
n rollouts fork, the suffix either stays in the buffer, copied to each row, or joins the shared prompt,
whichever holds fewer KV rows (`DecoderSession.fork`). The graph writes each chunk's K/V into it at
`cache_position`, and the runtime binds the buffer as both the past input and the present output (IO
binding), so onnxruntime writes just the new token's rows into it in place: a decode step copies no KV,
only the token's embedding in and a row of logits out. On CPU the buffers are numpy arrays the binding
wraps; on CUDA they are OrtValues on the GPU, where the KV stays.

Older bundles still run (`KV layouts`): a decoder without `cache_position` returns present = past + chunk,
a new array each step, which becomes the next step's past; one without a prefix input forks by repeating
the prompt's KV n times.
"""

from __future__ import annotations

import ctypes
import functools
import sys
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort

from runtimes.bundle import CACHE_POSITION, PREFIX_KV
from runtimes.protocol import RuntimeInputError

CUDA = "CUDAExecutionProvider"
CPU = "CPUExecutionProvider"
M_MMAP_THRESHOLD = -3  # glibc's mallopt parameter
MAPPED_FROM_BYTES = 16 << 20


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


@functools.cache
def map_large_buffers() -> bool:
    """Have glibc map every buffer of 16 MiB or more on its own (returned to the system when freed); True
    where that was set.

    By default glibc raises its mmap threshold to the largest block freed, up to 32 MiB, after which such
    blocks can land in the brk heap, and blocks allocated after them pin them there. Which way it goes
    depends on the timing of onnxruntime's threads: the bench's 65M fp32 bundle (256 px, 8 rollouts) peaked
    at 421-437 MB in most processes and 576-589 MB in about one in five, for the same work. With the
    threshold fixed at 16 MiB, 423-428 MB in 48 of 48, the same start time (1 MiB also holds it steady
    but costs 160 ms of page faults at load).
    """
    if not sys.platform.startswith("linux"):
        return False
    mallopt = getattr(ctypes.CDLL(None), "mallopt", None)
    return bool(mallopt and mallopt(M_MMAP_THRESHOLD, MAPPED_FROM_BYTES))


def open_session(path: Path, providers: Sequence[str]) -> ort.InferenceSession:
    map_large_buffers()
    options = ort.SessionOptions()
    options.log_severity_level = 3  # errors only: ORT's provider-fallback warnings are not the user's concern
    try:
        return ort.InferenceSession(str(path), options, providers=list(providers))
    except Exception as error:  # ORT raises its own exception types for malformed graphs
        raise RuntimeInputError(
            f"{path}: onnxruntime cannot load it ({' '.join(str(error).split())})"
        ) from None


Past = list[Any]  # per layer key, value: np.ndarray (host) or OrtValue (bound device, e.g. the GPU)


@dataclass(frozen=True)
class KV:
    """The KV cache of a batch of B sequences: the prompt's KV they share, and their own.

    shared: per layer key, value (1, kv_heads, shared_length, head_dim): read by every row, never written;
        None when nothing is shared.
    own: per layer (B, kv_heads, size, head_dim). With a buffer decoder its `size` slots are allocated
        once and `length` of them are written; with an older decoder it is exactly `length` long.
    """

    shared: Past | None
    shared_length: int
    own: Past
    length: int
    size: int


class DecoderSession:
    """The decoder graph: host inputs + KV in, last-position logits (float32 numpy) + the KV after the chunk out."""

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
        inputs = [i.name for i in session.get_inputs()]
        self.past_names = [name for name in inputs if name.startswith("past_key_values.")]
        self.prefix_names = [name for name in inputs if name.startswith(f"{PREFIX_KV}.")]
        self.present_names = [o.name for o in session.get_outputs() if o.name.startswith("present.")]
        self.in_place = CACHE_POSITION in inputs  # the own KV is a buffer the graph writes into
        # The KV lives where the graph runs: on the GPU with IO binding; on the host as numpy arrays.
        # bind_device="cpu" forces OrtValues on CPU, so tests without a GPU exercise the device path too.
        self.bind_device = bind_device or ("cuda" if session.get_providers()[0] == CUDA else None)

    def empty(self, batch: int) -> Past:
        """KV of length 0, for a prompt that has none."""
        zeros = np.zeros((batch, self.kv_heads, 0, self.head_dim), self.dtype)  # (B, n_kv_heads, 0, head_dim)
        return [zeros] * len(self.past_names)

    def start(self, prompt: Past | None, prompt_length: int, room: int) -> KV:
        """One sequence continuing a prompt's KV (None: none), with room for `room` more tokens.

        The prompt's KV is never written: a buffer decoder reads it as the shared prefix and writes the new
        tokens into a fresh buffer of `room` slots; an older one appends to it, into new arrays.
        """
        if self.in_place:
            return KV(prompt, prompt_length, self._buffer(1, room), 0, room)
        return KV(None, 0, prompt if prompt is not None else self.empty(1), prompt_length, prompt_length)

    def keys(self, kv: KV, chunk: int) -> int:
        """How many keys a chunk of `chunk` tokens attends over: the length of its attention mask."""
        return kv.shared_length + (kv.size if self.in_place else kv.length + chunk)

    def __call__(self, inputs: dict[str, np.ndarray], kv: KV) -> tuple[np.ndarray, KV]:
        """Run one chunk (inputs_embeds (B, S, H) and the family's inputs) on `kv` -> logits, the KV after it."""
        batch, chunk = inputs["inputs_embeds"].shape[:2]
        inputs = {**inputs, "attention_mask": np.ones((batch, self.keys(kv, chunk)), np.int64)}
        shared = kv.shared if kv.shared is not None else self.empty(1)
        shared = dict(zip(self.prefix_names, shared))
        if not self.in_place:
            logits, present = self._run(inputs, dict(zip(self.past_names, kv.own)) | shared)
            return logits, replace(kv, own=present, length=kv.length + chunk, size=kv.length + chunk)
        if kv.length + chunk > kv.size:
            raise ValueError(f"the KV buffer holds {kv.size} tokens; {kv.length} + {chunk} do not fit")
        binding = self.session.io_binding()
        self._bind_inputs(binding, {**inputs, CACHE_POSITION: np.array([kv.length], np.int64), **shared})
        binding.bind_output("logits", "cpu")  # first: get_outputs() lists the outputs in binding order
        for past, present, buffer in zip(self.past_names, self.present_names, kv.own):
            value = buffer if isinstance(buffer, ort.OrtValue) else ort.OrtValue.ortvalue_from_numpy(buffer)
            binding.bind_ortvalue_input(past, value)
            binding.bind_ortvalue_output(present, value)  # the same buffer: written in place
        self.session.run_with_iobinding(binding)
        logits = binding.get_outputs()[0].numpy()
        return logits.astype(np.float32, copy=False), replace(kv, length=kv.length + chunk)

    def _run(self, inputs: dict[str, np.ndarray], kv: dict[str, Any]) -> tuple[np.ndarray, Past]:
        """A decoder without `cache_position`: present = past + chunk, new arrays (on the bound device)."""
        if self.bind_device is None:
            outputs = self.session.run(None, {**inputs, **kv})
            return outputs[0].astype(np.float32, copy=False), outputs[1:]
        binding = self.session.io_binding()
        self._bind_inputs(binding, {**inputs, **kv})
        binding.bind_output("logits", "cpu")
        for name in self.present_names:
            binding.bind_output(name, self.bind_device)
        self.session.run_with_iobinding(binding)
        outputs = binding.get_outputs()
        return outputs[0].numpy().astype(np.float32, copy=False), list(outputs[1:])

    @staticmethod
    def _bind_inputs(binding: ort.IOBinding, values: dict[str, Any]) -> None:
        for name, value in values.items():
            if isinstance(value, np.ndarray):  # host inputs, and a KV that starts on the host
                binding.bind_cpu_input(name, np.ascontiguousarray(value))  # binding reads the raw buffer
            else:
                binding.bind_ortvalue_input(name, value)

    def _buffer(self, batch: int, size: int) -> Past:
        """Zeroed own-KV buffers, one per layer key and value: the unwritten slots are masked, and zeros
        keep them finite (a masked score still meets its value in the weighted sum)."""
        shape = (batch, self.kv_heads, size, self.head_dim)
        return [self._place(np.zeros(shape, self.dtype)) for _ in self.past_names]

    def _place(self, array: np.ndarray) -> Any:
        """A host array where the KV lives: itself, or an OrtValue on the bound device."""
        if self.bind_device is None:
            return array
        return ort.OrtValue.ortvalue_from_numpy(array, self.bind_device, 0)

    def fork(self, kv: KV, n: int) -> KV:
        """n sequences continuing a batch-1 KV; the input KV is never written.

        A buffer decoder takes whichever layout holds fewer KV rows. The rows each get a copy of the one
        sequence's buffer (its written suffix and the room left): n * (suffix + room) rows. Or the suffix
        joins the shared prompt, one batch-1 copy of prompt + suffix, and the rows get fresh buffers with
        the room alone: prompt + suffix + n * room rows, which is fewer when the prompt is shorter than
        n - 1 suffixes (a 256 px view and a question), and which every step then reads once, not n times.
        An older decoder with a prefix input takes the whole KV as the shared prefix, by reference, and
        starts the rows' own past empty; one without gets the KV repeated n times.
        """
        if not self.in_place and self.prefix_names:
            return KV(kv.own, kv.length, self.empty(n), 0, 0)
        if n == 1:
            return kv
        own = [_on_host(value) for value in kv.own]
        if not self.in_place or kv.shared_length >= (n - 1) * kv.length:
            return replace(kv, own=[self._place(np.repeat(value, n, axis=0)) for value in own])
        prompt = [value[:, :, : kv.length] for value in own]  # the suffix's written slots
        if kv.shared is not None:
            prompt = [
                np.concatenate([_on_host(shared), suffix], axis=2)
                for shared, suffix in zip(kv.shared, prompt, strict=True)
            ]
        room = kv.size - kv.length
        shared = [self._place(np.ascontiguousarray(value)) for value in prompt]
        return KV(shared, kv.shared_length + kv.length, self._buffer(n, room), 0, room)


def _on_host(value: Any) -> np.ndarray:
    """A KV tensor as a host array: itself, or a bound OrtValue copied out."""
    return value if isinstance(value, np.ndarray) else value.numpy()

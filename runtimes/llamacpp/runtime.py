"""The llama.cpp runtime: GGUF bundles through llama-cpp-python's low-level API (CPU, CUDA, Jetson).

llama-cpp-python's high-level `Llama` keeps one sequence and its chat handlers clear the KV cache on every
call, so nothing of an image prefix survives between rollouts. This runtime drives libllama and libmtmd
directly instead. Each weights variant gets one context whose unified KV cache holds many sequences:

    seq ids [0, prefix_slots)                      prefixes, each leased to one live Prefix
    seq ids [prefix_slots, prefix_slots + max_rollouts)   the working sequences of one generate call

`prefill` encodes the image once with libmtmd and decodes `[header][image]` once on a leased prefix
sequence. `generate` copies that sequence to working sequence w0 (`llama_memory_seq_cp` shares the KV
cells; the prefix is never mutated), decodes the suffix once on w0 (crops included), forks w0 to w1..wn-1
and decodes all n rollouts together, one llama_batch of n tokens per step; the logits go to the shared
host-side sampler (runtimes/decoding.py), one seeded stream per rollout. The working sequences are
cleared afterwards. With an f32 bundle a rollout draws the same tokens alone or in a batch; with f16 or
quantized weights llama.cpp's kernels (f16 KV, quantized matmuls, flash attention where on) may round a
batch of n differently from a batch of 1, so a near-tie can, rarely, sample differently. Flash attention
is off on the CPU unless asked for (`flash_attention`, see `text_flash_attention`).

Tokens come from the bundle's tokenizer.json, encoded as the reference runtime does (llama.cpp's own
tokenizer only serves libmtmd's image markers); positions follow runtimes/mrope.py's rules (libmtmd puts
an image's tokens at (t, row, col) offsets and advances max(h, w) / merge positions). Images are handed to
libmtmd as the exact RGB pixels the engine prepared (recovered from the normalized patches), already on
the 32 px grid, so libmtmd neither resizes nor upscales them (its Qwen minimum of 8 tokens is lowered to 1).

Prefix sequences are limited (`prefix_slots`, default 16): a Prefix's state is a lease that frees its
sequence on `release()` or when the Prefix is garbage collected (the engine's prefix cache just drops
evicted entries). More live prefixes than slots is refused with a clear error; keep the spec's
`model.prefix_cache` below `prefix_slots`. The KV cache (`n_ctx`, default 16384 tokens) is shared by all
sequences: prefixes plus n x (suffix + generated) tokens of the running call must fit.

An architecture libmtmd cannot run brings an `ImagePath` (family.py, keyed by the manifest's architecture) that
decodes prompt chunks itself: Molmo2's hybrid bundles compute image embeddings with ONNX graphs and decode
the image blocks non-causally (runtimes/llamacpp/molmo2.py). Sequences, forks and batched rollouts stay here.

This module must not import torch or transformers: it is the run path on devices.
"""

from __future__ import annotations

import ctypes
import gc
import os
import sys
import time
import weakref
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import llama_cpp
import numpy as np
from llama_cpp import mtmd_cpp as mtmd
from tokenizers import Tokenizer

from runtimes.bundle import Manifest, read_manifest, verify
from runtimes.decoding import decode
from runtimes.llamacpp.family import ImagePath
from runtimes.protocol import (
    Generation,
    Image,
    ImageConfig,
    ImageInput,
    ModelInfo,
    Prefix,
    RuntimeInputError,
    Sampling,
    Segment,
)

GGML_LOG_LEVEL_ERROR = 4


def cpu_has_amx() -> bool:
    """Whether llama.cpp's CPU backend would put quantized weights in its AMX buffer type (Intel AMX-INT8)."""
    return b"AMX_INT8 = 1" in llama_cpp.llama_print_system_info()


def text_flash_attention(asked: bool | None, *, exact: bool, on_gpu: bool) -> int:
    """llama.cpp's flash-attention setting for the text context: the one asked for, else the engine's choice.

    Left out, it is off on the CPU and for an f32 bundle, llama.cpp's own choice (auto) on a GPU.
    llama.cpp's CPU kernel walks every cell of the unified KV cache for every query row and rounds
    through f16 (an f32 bundle's logits would move by ~3e-3 instead of ~4e-6). Measured on the bench's
    65M model, 2 cores, q8_0 (f16 alike): a decoding step of 8 rollouts at 256 px 20.6 -> 16.7 ms with
    it off; perceive at 1600x1200, 32 tokens, decoding 2.9 -> 0.94 s with 8 rollouts and 0.73 -> 0.51 s
    with one, for a prefill 8-10% slower and 40 MB (7%) more peak memory. libmtmd's vision encoder keeps
    its own setting.
    """
    if asked is not None and not isinstance(asked, bool):
        raise RuntimeInputError(
            f"flash_attention: {asked!r}; it takes true, false or nothing (the engine picks)"
        )
    if asked is None and on_gpu and not exact:
        return llama_cpp.LLAMA_FLASH_ATTN_TYPE_AUTO
    return llama_cpp.LLAMA_FLASH_ATTN_TYPE_ENABLED if asked else llama_cpp.LLAMA_FLASH_ATTN_TYPE_DISABLED


@llama_cpp.llama_log_callback
def _log_errors_only(level: int, text: bytes, user_data: ctypes.c_void_p) -> None:
    # llama.cpp and libmtmd log every tensor and buffer at load; a CLI user wants only the errors
    if level == GGML_LOG_LEVEL_ERROR:
        print(text.decode("utf-8", "replace"), end="", file=sys.stderr)


def quiet_llama_logs() -> None:
    """Route llama.cpp's and libmtmd's logs through a filter that keeps only errors."""
    llama_cpp.llama_log_set(_log_errors_only, ctypes.c_void_p(0))
    mtmd.mtmd_log_set(_log_errors_only, ctypes.c_void_p(0))
    mtmd.mtmd_helper_log_set(_log_errors_only, ctypes.c_void_p(0))


def image_rgb(image: ImageInput, config: ImageConfig) -> np.ndarray:
    """The (H, W, 3) uint8 pixels behind Qwen-layout normalized patches (inverse of prepare_qwen_image).

    The engine resizes on uint8 and only then normalizes, so un-normalizing and rounding gives back those
    exact bytes; libmtmd then normalizes them with the same mean/std (from the mmproj).
    """
    t, grid_h, grid_w = image.grid_thw
    if t != 1:
        raise RuntimeInputError("the llamacpp runtime takes still images only (grid t = 1)")
    m, p = config.merge_size, config.patch_size
    patches = image.pixel_values.reshape(grid_h // m, grid_w // m, m, m, 3, config.temporal_patch_size, p, p)[
        :, :, :, :, :, 0
    ]  # (block_row, block_col, row_in_block, col_in_block, channel, y, x), first frame
    pixels = patches.transpose(0, 2, 5, 1, 3, 6, 4).reshape(grid_h * p, grid_w * p, 3)
    rgb = (pixels * np.asarray(config.std, np.float32) + np.asarray(config.mean, np.float32)) * 255.0
    return np.ascontiguousarray(np.clip(np.rint(rgb), 0, 255).astype(np.uint8))


class _SequenceLease:
    """A prefix sequence id on loan: release() (or garbage collection) clears its KV and returns the id."""

    def __init__(self, model: _VariantModel, seq_id: int) -> None:
        self.seq_id = seq_id
        self.owner = model  # the context the sequence lives in
        self._finalizer = weakref.finalize(self, model.free_prefix_sequence, seq_id)
        self._finalizer.atexit = False  # at exit the context is gone anyway

    @property
    def released(self) -> bool:
        return not self._finalizer.alive

    def release(self) -> None:
        self._finalizer()


@dataclass
class _PrefixState:
    lease: _SequenceLease
    logits: np.ndarray | None  # (vocab,) after the prefix's last token: generate with an empty suffix

    def release(self) -> None:
        self.lease.release()


class _VariantModel:
    """One weights variant: its llama model, its many-sequence context and its libmtmd context."""

    def __init__(self, text: Path, mmproj: Path | None, image: ImageConfig, options: dict) -> None:
        model_params = llama_cpp.llama_model_default_params()
        model_params.n_gpu_layers = options["n_gpu_layers"]
        # llama-cpp-python 0.3.36 on an AMX-INT8 Xeon segfaults in the first llama_decode of a q8_0 or
        # q4_k_m model whose weights sit in ggml's AMX buffer type (seen with hidden sizes 128 and 512; f16
        # weights there run): on such a CPU a quantized model's weights stay in plain CPU buffers (this also
        # skips ggml's repacked CPU layouts)
        model_params.use_extra_bufts = options["extra_buffer_types"]
        self.model = llama_cpp.llama_model_load_from_file(str(text).encode(), model_params)
        if not self.model:
            raise RuntimeInputError(f"llama.cpp could not load {text}")
        self.prefix_slots, self.max_rollouts = options["prefix_slots"], options["max_rollouts"]
        params = llama_cpp.llama_context_default_params()
        params.n_ctx = options["n_ctx"]
        params.n_batch = options["n_batch"]  # tokens per llama_decode call (llama.cpp splits it in ubatches)
        if options.get("n_ubatch"):  # a family that decodes whole non-causal blocks needs them in one ubatch
            params.n_ubatch = options["n_ubatch"]
        params.n_seq_max = self.prefix_slots + self.max_rollouts
        params.kv_unified = True  # one KV buffer: forked sequences share the prefix's cells
        params.n_threads = params.n_threads_batch = options["n_threads"]
        params.no_perf = True
        # an f32 bundle exists for exactness (parity tests, debugging): keep its KV cache in f32 (other
        # bundles keep llama.cpp's f16 KV)
        if options["exact"]:
            params.type_k = params.type_v = llama_cpp.GGML_TYPE_F32
        params.flash_attn_type = options["flash_attention"]
        self.ctx = llama_cpp.llama_init_from_model(self.model, params)
        if not self.ctx:
            llama_cpp.llama_model_free(self.model)
            raise RuntimeInputError(
                f"llama.cpp could not create a context (n_ctx {params.n_ctx}, {params.n_seq_max} sequences)"
            )
        self.memory = llama_cpp.llama_get_memory(self.ctx)
        self.n_vocab = llama_cpp.llama_vocab_n_tokens(llama_cpp.llama_model_get_vocab(self.model))
        self.n_batch = options["n_batch"]
        self.images: Any = None  # a family hook's per-variant image state (Molmo2: its ONNX sessions)
        self.mtmd = None
        if mmproj is not None:
            self._init_mtmd(mmproj, image, options)
        self.free_prefixes = list(range(self.prefix_slots))
        self.working = list(range(self.prefix_slots, self.prefix_slots + self.max_rollouts))
        self.closed = False

    def _init_mtmd(self, mmproj: Path, image: ImageConfig, options: dict) -> None:
        mparams = mtmd.mtmd_context_params_default()
        mparams.use_gpu = options["n_gpu_layers"] != 0
        mparams.n_threads = options["n_threads"]
        mparams.print_timings = False
        mparams.warmup = False
        if options["exact"]:
            mparams.flash_attn_type = llama_cpp.LLAMA_FLASH_ATTN_TYPE_DISABLED
        token_area = (image.patch_size * image.merge_size) ** 2
        mparams.image_min_tokens = 1  # the engine sized the image already: never upscale it
        mparams.image_max_tokens = max(1, image.max_pixels // token_area)
        self.mtmd = mtmd.mtmd_init_from_file(str(mmproj).encode(), self.model, mparams)
        if not self.mtmd:
            llama_cpp.llama_free(self.ctx)
            llama_cpp.llama_model_free(self.model)
            raise RuntimeInputError(f"libmtmd could not load the vision projector {mmproj}")

    def lease_prefix_sequence(self) -> _SequenceLease:
        if not self.free_prefixes:
            gc.collect()  # prefixes dropped inside reference cycles free their sequences here
        if not self.free_prefixes:
            raise RuntimeInputError(
                f"all {self.prefix_slots} prefix sequences are held by live prefixes: release some "
                "(Prefix.state.release()) or open the runtime with a larger prefix_slots"
            )
        return _SequenceLease(self, self.free_prefixes.pop(0))

    def free_prefix_sequence(self, seq_id: int) -> None:
        if not self.closed:
            self.clear(seq_id)
            self.free_prefixes.append(seq_id)

    def clear(self, seq_id: int) -> None:
        llama_cpp.llama_memory_seq_rm(self.memory, seq_id, -1, -1)

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            if self.mtmd is not None:
                mtmd.mtmd_free(self.mtmd)
            llama_cpp.llama_free(self.ctx)
            llama_cpp.llama_model_free(self.model)


class LlamaCppRuntime:
    def __init__(
        self,
        bundle: str | Path,
        device: str = "auto",
        *,
        n_ctx: int = 16384,
        prefix_slots: int = 16,
        max_rollouts: int = 64,
        n_batch: int = 2048,
        n_threads: int | None = None,
        flash_attention: bool | None = None,
        verbose: bool = False,
    ) -> None:
        self.bundle = Path(bundle)
        self.manifest: Manifest = read_manifest(self.bundle)
        if self.manifest.format != "gguf":
            raise RuntimeInputError(
                f"{self.bundle}: a {self.manifest.format} bundle; the llamacpp runtime needs one from "
                "`sparc-engine export gguf`"
            )
        llama_cpp.llama_backend_init()
        if not verbose:
            quiet_llama_logs()
        n_gpu_layers, exact = self._gpu_layers(device), self.manifest.dtype == "f32"
        self.options = {
            "n_ctx": n_ctx,
            "prefix_slots": prefix_slots,
            "max_rollouts": max_rollouts,
            "n_batch": n_batch,
            "n_threads": n_threads or os.cpu_count() or 1,
            "n_gpu_layers": n_gpu_layers,
            "exact": exact,
            "extra_buffer_types": self.manifest.dtype in ("f32", "f16") or not cpu_has_amx(),
            "flash_attention": text_flash_attention(flash_attention, exact=exact, on_gpu=n_gpu_layers != 0),
        }
        if prefix_slots + max_rollouts > 256:  # LLAMA_MAX_SEQ
            raise RuntimeInputError("prefix_slots + max_rollouts must stay within llama.cpp's 256 sequences")
        verify(self.bundle, self.manifest)  # every file, once the options hold, before anything is loaded
        self.tokenizer = Tokenizer.from_file(str(self.bundle / "tokenizer.json"))
        tokens = self.manifest.tokens
        self.image_token_id = int(tokens["image_token_id"])
        self.eos_ids = [int(t) for t in tokens["eos_token_ids"]]
        max_positions = int(self.manifest.model.get("max_position_embeddings") or n_ctx)
        self.info = ModelInfo(
            architecture=self.manifest.architecture,
            image=self.manifest.image,
            variants=tuple(self.manifest.variants),
            max_context=min(n_ctx, max_positions),
        )
        self._models: dict[str, _VariantModel] = {}
        # an architecture without a libmtmd projector brings its own image path
        hook = ImagePath.registry.get(self.manifest.architecture)
        self.hook = hook(self, device) if hook else None

    @staticmethod
    def _gpu_layers(device: str) -> int:
        offload = bool(llama_cpp.llama_supports_gpu_offload())
        if device == "cuda" and not offload:
            raise RuntimeInputError(
                "device: cuda was asked for but this llama-cpp-python build has no GPU backend "
                '(reinstall with CMAKE_ARGS="-DGGML_CUDA=on")'
            )
        return -1 if device != "cpu" and offload else 0  # -1: every layer on the GPU

    def model(self, variant: str) -> _VariantModel:
        if variant not in self.info.variants:
            raise RuntimeInputError(
                f"variant {variant!r} is not available here (have: {', '.join(self.info.variants)})"
            )
        if variant not in self._models:
            text = self.bundle / self.manifest.file(variant, "text")
            if self.hook is not None:
                model = _VariantModel(text, None, self.info.image, self.options)
                model.images = self.hook.open(variant)
                self._models[variant] = model
            else:
                mmproj = self.bundle / self.manifest.file(variant, "mmproj")
                self._models[variant] = _VariantModel(text, mmproj, self.info.image, self.options)
        return self._models[variant]

    # ------------------------------------------------------------------------------------ evaluation

    def _decode_text(
        self, model: _VariantModel, ids: list[int], seq_id: int, position: int, logits_last: bool
    ) -> None:
        for start in range(0, len(ids), model.n_batch):
            chunk = ids[start : start + model.n_batch]
            batch = llama_cpp.llama_batch_init(len(chunk), 0, 1)
            try:
                for i, token in enumerate(chunk):
                    batch.token[i] = token
                    batch.pos[i] = position + start + i  # text: the same position on all M-RoPE axes
                    batch.n_seq_id[i] = 1
                    batch.seq_id[i][0] = seq_id
                    batch.logits[i] = logits_last and start + i == len(ids) - 1
                batch.n_tokens = len(chunk)
                self._check(llama_cpp.llama_decode(model.ctx, batch), "decoding the prompt")
            finally:
                llama_cpp.llama_batch_free(batch)

    def _decode_image(
        self, model: _VariantModel, image: ImageInput, seq_id: int, position: int, logits_last: bool
    ) -> int:
        """Encode one image with libmtmd and decode its embeddings on `seq_id`; returns the positions it took."""
        rgb = image_rgb(image, self.info.image)
        height, width = rgb.shape[:2]
        bitmap = mtmd.mtmd_bitmap_init(width, height, (ctypes.c_uint8 * rgb.size).from_buffer(rgb))
        chunks = mtmd.mtmd_input_chunks_init()
        try:
            # libmtmd wraps the image in its own <|vision_start|>/<|vision_end|> text chunks; the engine's
            # prompt already has them, so only the image chunk is evaluated
            marker = mtmd.mtmd_default_marker()
            text = mtmd.mtmd_input_text(
                text=marker, text_len=len(marker), add_special=False, parse_special=True
            )
            bitmaps = (mtmd.mtmd_bitmap_p_ctypes * 1)(bitmap)
            self._check(
                mtmd.mtmd_tokenize(model.mtmd, chunks, ctypes.byref(text), bitmaps, 1), "tokenizing an image"
            )
            found = [
                mtmd.mtmd_input_chunks_get(chunks, i)
                for i in range(mtmd.mtmd_input_chunks_size(chunks))
                if mtmd.mtmd_input_chunk_get_type(mtmd.mtmd_input_chunks_get(chunks, i))
                == mtmd.MTMD_INPUT_CHUNK_TYPE_IMAGE
            ]
            n_tokens = mtmd.mtmd_input_chunk_get_n_tokens(found[0]) if len(found) == 1 else -1
            if n_tokens != image.n_tokens:
                raise RuntimeInputError(
                    f"libmtmd made {n_tokens} tokens of a {width}x{height} image, the engine expects "
                    f"{image.n_tokens}: the mmproj does not match the bundle's preprocessing"
                )
            new_position = llama_cpp.llama_pos(0)
            rc = mtmd.mtmd_helper_eval_chunk_single(
                model.mtmd,
                model.ctx,
                found[0],
                position,
                seq_id,
                model.n_batch,
                logits_last,
                ctypes.byref(new_position),
            )
            self._check(rc, "decoding an image")
            return new_position.value - position
        finally:
            mtmd.mtmd_input_chunks_free(chunks)
            mtmd.mtmd_bitmap_free(bitmap)

    def _eval(
        self, model: _VariantModel, segments: Sequence[Segment], seq_id: int, position: int
    ) -> tuple[list[int], int, np.ndarray | None]:
        """Decode segments on `seq_id` from rope `position`: (token ids, next position, last logits or None)."""
        if self.hook is not None:
            return self.hook.eval(model, segments, seq_id, position)
        runs: list[list[int] | ImageInput] = []  # consecutive text is decoded as one run
        ids: list[int] = []
        for segment in segments:
            if isinstance(segment, Image):
                runs.append(segment.image)
                ids += [self.image_token_id] * segment.image.n_tokens
                continue
            text_ids = self.tokenizer.encode(segment.text, add_special_tokens=False).ids
            if runs and isinstance(runs[-1], list):
                runs[-1] += text_ids
            elif text_ids:
                runs.append(list(text_ids))
            ids += text_ids
        for index, run in enumerate(runs):
            last = index == len(runs) - 1
            if isinstance(run, list):
                self._decode_text(model, run, seq_id, position, last)
                position += len(run)
            else:
                position += self._decode_image(model, run, seq_id, position, last)
        logits = self._logits(model, 1)[0] if runs else None
        return ids, position, logits

    def _logits(self, model: _VariantModel, n: int) -> np.ndarray:
        """(n, vocab) logits of the last decode's n outputs, copied out of llama.cpp's buffer."""
        if n == 1:
            return np.ctypeslib.as_array(
                llama_cpp.llama_get_logits_ith(model.ctx, -1), shape=(1, model.n_vocab)
            ).copy()
        return np.ctypeslib.as_array(llama_cpp.llama_get_logits(model.ctx), shape=(n, model.n_vocab)).copy()

    @staticmethod
    def _check(rc: int, what: str) -> None:
        if rc == 1:
            raise RuntimeInputError(
                f"llama.cpp: the KV cache is full while {what}: open the runtime with a larger n_ctx"
            )
        if rc != 0:
            raise RuntimeInputError(f"llama.cpp failed while {what} (code {rc})")

    # -------------------------------------------------------------------------------------- protocol

    def prefill(self, segments: Sequence[Segment], variant: str = "base") -> Prefix:
        model = self.model(variant)
        lease = model.lease_prefix_sequence()
        try:
            ids, next_position, logits = self._eval(model, segments, lease.seq_id, 0)
        except BaseException:
            lease.release()
            raise
        return Prefix(
            variant=variant,
            token_ids=ids,
            next_position=next_position,
            computed_tokens=len(ids),
            state=_PrefixState(lease, logits),
            images=tuple(s.image for s in segments if isinstance(s, Image)),
        )

    def generate(
        self, prefix: Prefix, suffix: Sequence[Segment], n: int, sampling: Sampling
    ) -> list[Generation]:
        start = time.perf_counter()
        model = self.model(prefix.variant)
        state = prefix.state
        if not isinstance(state, _PrefixState) or state.lease.owner is not model or state.lease.released:
            raise RuntimeInputError("this prefix was not computed by this runtime, or was released")
        if not 1 <= n <= model.max_rollouts:
            raise RuntimeInputError(f"n = {n} rollouts: this runtime was opened for 1..{model.max_rollouts}")
        work = model.working[:n]
        batch = llama_cpp.llama_batch_init(n, 0, 1)
        try:
            llama_cpp.llama_memory_seq_cp(model.memory, state.lease.seq_id, work[0], -1, -1)
            ids, position, logits = self._eval(model, suffix, work[0], prefix.next_position)
            logits = logits if ids else state.logits
            if logits is None:
                raise RuntimeInputError("generate needs a non-empty prompt")
            for seq_id in work[1:]:  # fork the whole prompt: every rollout reuses the suffix's KV too
                llama_cpp.llama_memory_seq_cp(model.memory, work[0], seq_id, -1, -1)

            def step(tokens: np.ndarray) -> np.ndarray:
                nonlocal position
                for i, token in enumerate(tokens.tolist()):  # one token per rollout, all in one batch
                    batch.token[i] = token
                    batch.pos[i] = position
                    batch.n_seq_id[i] = 1
                    batch.seq_id[i][0] = work[i]
                    batch.logits[i] = True
                batch.n_tokens = n
                self._check(llama_cpp.llama_decode(model.ctx, batch), "decoding rollouts")
                position += 1
                return self._logits(model, n)

            result = decode(np.repeat(logits[None], n, axis=0), step, sampling, self.eos_ids)
        finally:
            llama_cpp.llama_batch_free(batch)
            for seq_id in work:
                model.clear(seq_id)
        return result.generations(self.tokenizer, prefix.n_tokens, len(ids), start)

    def close(self) -> None:
        for model in self._models.values():
            model.close()
        self._models.clear()

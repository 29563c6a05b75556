"""Molmo2 in the llama.cpp runtime: the Qwen3 text decoder in llama.cpp, the images through ONNX graphs.

A hybrid bundle (export/gguf/molmo2.py) has the text decoder as a `qwen3` GGUF and Molmo2's vision and
embed graphs as ONNX. The prompt is laid out and positioned (1-D, sequential over image tokens too) by
runtimes/families/molmo2.py, and an image block's embeddings are computed exactly as the ONNX runtime does
(runtimes/onnx/molmo2.py: embed graph, plus the vision features added at <im_patch>), reusing its family.

Text is decoded by token id, causally. The reference lets the image tokens of a chunk (every token that
`image_layout.token_types` marks, start/column/end tokens included) attend to each other in both
directions; llama.cpp does that for one batch with `llama_set_causal_attn(ctx, False)`: its tokens see the
sequence's cached prefix and the whole batch. So each chunk's image block is decoded as ONE embeddings
batch, non-causally, which needs the block in one ubatch (n_ubatch = n_batch; a larger block is refused).
A block of several images (the global view with its crops) is one run of image tokens and so one batch.
Text between two image blocks of one chunk would have to see the later block (the reference's mask lets
the earlier image tokens see the later ones, and the text sits in between), which one llama.cpp batch
cannot express: such a chunk is refused. The engine never builds one (crops follow the view directly).

No torch or transformers here either: onnxruntime and numpy only.
"""

from __future__ import annotations

import ctypes
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import llama_cpp
import numpy as np

from runtimes.families import molmo2 as image_layout
from runtimes.llamacpp.family import ImagePath
from runtimes.mrope import TokenizedPrompt
from runtimes.protocol import RuntimeInputError, Segment

if TYPE_CHECKING:
    import onnxruntime as ort

    from runtimes.llamacpp.runtime import LlamaCppRuntime, _VariantModel


@dataclass
class _Graphs:
    vision: ort.InferenceSession
    embed: ort.InferenceSession


class Molmo2ImagePath(ImagePath):
    """The runtime's image path for Molmo2 bundles: ONNX sessions per variant and the chunk decoding."""

    architectures = ("Molmo2ForConditionalGeneration",)

    def __init__(self, runtime: LlamaCppRuntime, device: str) -> None:
        # onnxruntime is imported when a Molmo2 bundle is opened, not with the runtime: a Qwen3-VL GGUF
        # user does not pay its import at every start
        from runtimes.onnx.molmo2 import Molmo2OnnxFamily
        from runtimes.onnx.session import pick_providers

        super().__init__(runtime, device)
        # the ONNX graphs are fp32 whatever the text quant (the exporter writes them so)
        self.family = Molmo2OnnxFamily(runtime.manifest, runtime.tokenizer, np.float32)
        self.providers = pick_providers("auto" if device not in ("cpu", "cuda") else device)
        runtime.options["n_ubatch"] = runtime.options["n_batch"]  # a whole image block per ubatch

    def open(self, variant: str) -> _Graphs:
        from runtimes.onnx.session import open_session

        manifest, bundle = self.runtime.manifest, self.runtime.bundle
        vision, embed = (
            open_session(bundle / manifest.file(variant, r), self.providers) for r in ("vision", "embed")
        )
        return _Graphs(vision, embed)

    def eval(
        self, model: _VariantModel, segments: Sequence[Segment], seq_id: int, position: int
    ) -> tuple[list[int], int, np.ndarray | None]:
        """Decode a chunk on `seq_id` from `position`: (token ids, next position, last logits or None)."""
        prompt = self.family.tokenize(segments, position)
        ids = prompt.token_ids
        if not ids:
            return ids, position, None
        image = image_layout.token_types(ids, self.family.vocab).astype(bool)  # (S,)
        edges = np.flatnonzero(np.diff(np.concatenate([[0], image.astype(np.int8), [0]])))
        blocks = list(zip(edges[::2].tolist(), edges[1::2].tolist()))  # [start, end) runs of image tokens
        if len(blocks) > 1:
            raise RuntimeInputError(
                "a Molmo2 chunk with text between its images cannot run on llama.cpp (the reference lets the "
                "earlier image attend past the text to the later one); put the images next to each other"
            )
        runs = [(0, len(ids), False)]
        if blocks:
            (start, end), last = blocks[0], len(ids)
            runs = [r for r in ((0, start, False), (start, end, True), (end, last, False)) if r[0] < r[1]]
        graphs: _Graphs = model.images
        for start, end, is_image in runs:
            logits_last = end == len(ids)
            if is_image:
                self._decode_block(model, graphs, prompt, start, end, seq_id, position, logits_last)
            else:
                text = ids[start:end]
                if max(text) >= model.n_vocab:
                    raise RuntimeInputError(f"token {max(text)} is outside the text vocabulary of the GGUF")
                self.runtime._decode_text(model, text, seq_id, position + start, logits_last)
        return ids, prompt.next_position, self.runtime._logits(model, 1)[0]

    def _decode_block(
        self,
        model: _VariantModel,
        graphs: _Graphs,
        prompt: TokenizedPrompt,
        start: int,
        end: int,
        seq_id: int,
        position: int,
        logits_last: bool,
    ) -> None:
        """The image block [start, end) of the chunk as one non-causal embeddings batch."""
        n = end - start
        if n > model.n_batch:
            raise RuntimeInputError(
                f"an image block of {n} tokens does not fit one llama.cpp batch: open the runtime with "
                f"n_batch >= {n}"
            )
        (embeds,) = graphs.embed.run(None, {"input_ids": np.array([prompt.token_ids], np.int64)})  # (1, S, H)
        # adds the features at <im_patch>; the chunk alone, nothing cached before it
        self.family.chunk_inputs(graphs.vision, prompt, embeds, (), len(prompt.token_ids))
        block = np.ascontiguousarray(embeds[0, start:end], np.float32)  # (n, H)
        batch = llama_cpp.llama_batch_init(n, block.shape[1], 1)
        try:
            ctypes.memmove(batch.embd, block.ctypes.data, block.nbytes)
            for i in range(n):
                batch.pos[i] = position + start + i  # 1-D rope: sequential over image tokens too
                batch.n_seq_id[i] = 1
                batch.seq_id[i][0] = seq_id
                batch.logits[i] = logits_last and i == n - 1
            batch.n_tokens = n
            llama_cpp.llama_set_causal_attn(model.ctx, False)
            try:
                self.runtime._check(llama_cpp.llama_decode(model.ctx, batch), "decoding an image block")
            finally:
                llama_cpp.llama_set_causal_attn(model.ctx, True)
        finally:
            llama_cpp.llama_batch_free(batch)

"""The onnxruntime runtime: runs an ONNX bundle (see export/onnx) with numpy and tokenizers only.

No torch or transformers anywhere in its import chain, so a device installs `sparc-engine[onnx]` alone.
It follows the reference runtime step for step: prompts are tokenized and positioned host-side, images go
through the vision graph and their features are merged into the prompt's embeddings, a prefix is prefilled
once, and `generate` runs the suffix once, forks the KV into n sequences and decodes them as one batch,
all n attending to one copy of the prompt's KV (with the suffix, where that holds fewer rows) and writing
their own into buffers in place (runtimes/onnx/session.py).
What differs between architectures (tokens and positions, the vision graph's inputs, the decoder's extra
inputs) sits in an `OnnxRuntimeFamily` (runtimes/onnx/family.py) picked by the manifest's architecture.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort
from tokenizers import Tokenizer

from runtimes.bundle import read_manifest, verify
from runtimes.decoding import decode
from runtimes.mrope import TokenizedPrompt
from runtimes.onnx.family import onnx_family_for
from runtimes.onnx.session import KV, DecoderSession, open_session, pick_providers
from runtimes.protocol import Generation, ImageInput, ModelInfo, Prefix, RuntimeInputError, Sampling, Segment

ROLES = ("vision", "embed", "decoder")
DTYPES = {"fp32": np.float32, "fp16": np.float16}


@dataclass
class _Graphs:
    """The sessions one weights variant runs on (a variant shares base's sessions for the graphs it lacks)."""

    vision: ort.InferenceSession
    embed: ort.InferenceSession
    decoder: DecoderSession


class OnnxRuntime:
    def __init__(self, bundle: str | Path, device: str = "auto") -> None:
        self.bundle = Path(bundle)
        self.manifest = read_manifest(self.bundle)
        if self.manifest.format != "onnx":
            raise RuntimeInputError(f"{self.bundle}: a {self.manifest.format} bundle, not onnx")
        if self.manifest.dtype not in DTYPES:
            raise RuntimeInputError(
                f"{self.bundle}: the onnx runtime runs {' or '.join(DTYPES)} bundles, not {self.manifest.dtype}"
            )
        self.providers = pick_providers(device)
        self.sizes = self.manifest.model
        self.dtype = DTYPES[self.manifest.dtype]
        self.eos_ids = list(self.manifest.tokens["eos_token_ids"])
        verify(self.bundle, self.manifest, ["tokenizer.json"])
        self.tokenizer = Tokenizer.from_file(str(self.bundle / "tokenizer.json"))
        self.family = onnx_family_for(self.manifest, self.tokenizer, self.dtype)
        self.info = ModelInfo(
            architecture=self.manifest.architecture,
            image=self.manifest.image,
            variants=tuple(self.manifest.variants),
            max_context=int(self.sizes.get("max_position_embeddings", 32768)),
        )
        self._sessions: dict[str, ort.InferenceSession] = {}  # by file: variants share base's graphs
        self._variants: dict[str, _Graphs] = {}
        self.graphs("base")  # a broken bundle fails here, not in the middle of a query

    def graphs(self, variant: str) -> _Graphs:
        """The variant's sessions; its files are checked against the manifest before they are first loaded."""
        if variant not in self._variants:
            files = {role: self.manifest.file(variant, role) for role in ROLES}  # refuses a missing variant
            # a graph may have been written with external data (`<file>.data`): check that too
            used = [f for f in self.manifest.files if any(f.startswith(p) for p in files.values())]
            verify(self.bundle, self.manifest, used)
            sessions = {role: self._session(path) for role, path in files.items()}
            kv_shape = (int(self.sizes["num_key_value_heads"]), int(self.sizes["head_dim"]))
            decoder = DecoderSession(sessions["decoder"], kv_shape, self.dtype)
            self._variants[variant] = _Graphs(sessions["vision"], sessions["embed"], decoder)
        return self._variants[variant]

    def _session(self, relative: str) -> ort.InferenceSession:
        if relative not in self._sessions:
            self._sessions[relative] = open_session(self.bundle / relative, self.providers)
        return self._sessions[relative]

    def _tokenize(self, segments: Sequence[Segment], start_position: int) -> TokenizedPrompt:
        return self.family.tokenize(segments, start_position)

    def vision(self, graphs: _Graphs, images: Sequence[ImageInput]) -> Any:
        """The vision graph's outputs for `images` (the family's layout, e.g. Qwen3-VL's embeds + DeepStack)."""
        return self.family.vision(graphs.vision, images)

    def _forward(
        self, graphs: _Graphs, prompt: TokenizedPrompt, kv: KV, history: Sequence[int] = ()
    ) -> tuple[np.ndarray, KV]:
        """Run prompt tokens on top of `kv` (`history`: the ids of the tokens already in it, where the
        family's mask looks back); returns last-token logits (vocab,) and the KV after them."""
        length = len(prompt.token_ids)
        cached = kv.shared_length + kv.length
        if cached + length > self.info.max_context:
            raise RuntimeInputError(
                f"the prompt needs {cached + length} tokens; the model takes {self.info.max_context}"
            )
        ids = np.array([prompt.token_ids], dtype=np.int64)  # (1, S)
        (embeds,) = graphs.embed.run(None, {"input_ids": ids})  # (1, S, H)
        keys = graphs.decoder.keys(kv, length)
        extra = self.family.chunk_inputs(graphs.vision, prompt, embeds, history, keys)  # fills in the images
        logits, kv = graphs.decoder({"inputs_embeds": embeds, **extra}, kv)
        return logits[0], kv

    def prefill(self, segments: Sequence[Segment], variant: str = "base") -> Prefix:
        graphs = self.graphs(variant)  # refuse an unknown variant or a changed file before any work
        prompt = self._tokenize(segments, 0)
        past, logits = graphs.decoder.empty(1), None
        if prompt.token_ids:
            kv = graphs.decoder.start(None, 0, room=len(prompt.token_ids))
            logits, kv = self._forward(graphs, prompt, kv)
            past = kv.own  # batch 1, exactly the prompt's tokens
        return prompt.prefix(variant, (past, logits))

    def generate(
        self, prefix: Prefix, suffix: Sequence[Segment], n: int, sampling: Sampling
    ) -> list[Generation]:
        start = time.perf_counter()
        graphs = self.graphs(prefix.variant)
        past, logits = prefix.state  # never written to: the prompt's KV, shared by all n rollouts
        prompt = self._tokenize(suffix, prefix.next_position)
        # room for the suffix and every sampled token but the last, which is never fed back
        room = len(prompt.token_ids) + max(sampling.max_new_tokens - 1, 0)
        kv = graphs.decoder.start(past, prefix.n_tokens, room)
        if prompt.token_ids:
            logits, kv = self._forward(graphs, prompt, kv, prefix.token_ids)
        if logits is None:
            raise RuntimeInputError("generate needs a non-empty prompt")
        kv = graphs.decoder.fork(kv, n)
        next_position = prompt.next_position

        def step(tokens: np.ndarray) -> np.ndarray:
            nonlocal kv, next_position
            (embeds,) = graphs.embed.run(None, {"input_ids": tokens.astype(np.int64)[:, None]})  # (n, 1, H)
            extra = self.family.step_inputs(n, graphs.decoder.keys(kv, 1), next_position)
            step_logits, kv = graphs.decoder({"inputs_embeds": embeds, **extra}, kv)
            next_position += 1
            return step_logits  # (n, vocab)

        result = decode(np.repeat(logits[None], n, axis=0), step, sampling, self.eos_ids)
        return result.generations(self.tokenizer, prefix.n_tokens, len(prompt.token_ids), start)

    def close(self) -> None:
        self._variants.clear()
        self._sessions.clear()

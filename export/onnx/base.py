"""What an ONNX exporter must know of one model family, the registry of families, and what they share.

A family is one subclass filed under the Hugging Face `architectures` names it serves (the checkpoint's
`config.json`), like llama.cpp's converter classes: adding Molmo2 is adding `export/onnx/molmo2.py` with a
subclass and importing it in `export/onnx/__init__.py`. The format driver (`export/onnx/__init__.py`)
writes files and the manifest; a family only says which graphs exist and how to build each.

Every family is a transformers image-text-to-text model: a vision tower in front of `model.language_model`
+ `lm_head`, exported as the vision, embed and decoder graphs the ONNX runtime runs. So the text side lives
here (the embed graph, the decoder's KV plumbing, causal mask and logits, its example inputs, the text
sizes and parameter roles); a family adds its vision graph and its decoder's positions, extra input and
layer loop.

The decoder serves prefill and decoding with one graph and shares a prompt between rollouts: besides the
sequences' own KV (batch B) it takes a SHARED PREFIX KV per layer, batch 1, that every sequence attends to
and no step copies (`shared_prefix_attention`). A prefill passes an empty prefix; `generate` passes the
prompt's KV as the prefix of all N rollouts, so they hold one copy of it, not N.

The own KV is a BUFFER with room for the chunk: `cache_position` says where the chunk's K/V go, and
`present` is the buffer with them written (ONNX ScatterND), the same shape as the past. The chunk's
queries see the prefix and the buffer up to themselves, so the unwritten tail is masked by causality.
A runtime that binds `present` to the very buffer it passes as the past (IO binding) has ScatterND write
only the chunk's rows in place (onnxruntime skips its copy when input and output are one buffer, on CPU
and CUDA): a decode step copies no KV.
"""

from __future__ import annotations

import contextlib
from abc import ABC, abstractmethod
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar

import torch
from torch import nn
from torch.onnx import register_custom_op_symbolic
from transformers import AttentionInterface

from runtimes.bundle import CACHE_POSITION, PREFIX_KV
from runtimes.protocol import ImageConfig
from runtimes.registry import Registered, Registry
from runtimes.torch_ref.checkpoint import checkpoint_image_config

# The example sizes a decoder is traced with: distinct, so no axis is mistaken for another. The chunk of
# LENGTH tokens is written into the own KV buffer of PAST slots at WRITE_AT.
BATCH, LENGTH, PAST, PREFIX = 2, 3, 4, 5
WRITE_AT = PAST - LENGTH


@dataclass
class Graph:
    """One graph to export: a torch module traced with example inputs."""

    module: torch.nn.Module
    inputs: tuple[torch.Tensor, ...]  # example inputs, in the order of input_names
    input_names: list[str]
    output_names: list[str]
    dynamic_axes: dict[str, dict[int, str]] = field(default_factory=dict)


DecoderInput = tuple[torch.Tensor, dict[int, str]]  # an example input and its dynamic axes


class OnnxFamily(Registered, ABC):
    registry = Registry("ONNX export")
    # graph roles, in export order; each becomes `<variant>/<role>.onnx`, built by the family's `<role>_graph`
    roles: ClassVar[tuple[str, ...]] = ("vision", "embed", "decoder")

    def __init__(self, config: dict, model_dir: Path) -> None:
        self.config = config  # the checkpoint's config.json
        self.text = config["text_config"]
        self.model_dir = model_dir  # the checkpoint, for the processor files next to config.json
        # read (and contradictions refused) here, before the model is loaded
        self.image = checkpoint_image_config(model_dir)

    def graph(self, model: nn.Module, role: str) -> Graph:
        """The wrapper module and example inputs of one role, for a loaded (eval, float) model."""
        if role not in self.roles:
            raise ValueError(f"unknown role {role!r}")
        return getattr(self, f"{role}_graph")(model, next(model.parameters()).dtype)

    @abstractmethod
    def vision_graph(self, model: nn.Module, dtype: torch.dtype) -> Graph:
        """The vision tower (and projector) over pixels -> the features the image tokens get."""

    def embed_graph(self, model: nn.Module, dtype: torch.dtype) -> Graph:
        """input_ids -> inputs_embeds with transformers' input embeddings: alike in every family."""
        ids = torch.zeros((1, 5), dtype=torch.int64)
        axes = {"input_ids": {0: "batch", 1: "sequence"}, "inputs_embeds": {0: "batch", 1: "sequence"}}
        return Graph(
            EmbedTokens(model.get_input_embeddings()), (ids,), ["input_ids"], ["inputs_embeds"], axes
        )

    @abstractmethod
    def decoder_graph(self, model: nn.Module, dtype: torch.dtype) -> Graph:
        """The family's TextDecoder with its positions and extra input, through `kv_decoder_graph`."""

    def kv_decoder_graph(
        self,
        decoder: TextDecoder,
        dtype: torch.dtype,
        position_ids: DecoderInput,
        extra: dict[str, DecoderInput],
    ) -> Graph:
        """A decoder graph: inputs_embeds, position_ids, attention_mask (over prefix + past), the family's
        `extra` inputs, cache_position (1,), the past KV buffer per layer and the shared prefix KV per layer
        (batch 1) -> last-position logits and present KV (the past with the chunk written) per layer."""
        sizes = self.sizes()
        kv_heads, head_dim = sizes["num_key_value_heads"], sizes["head_dim"]
        layer_names = [f"{i}.{kind}" for i in range(sizes["num_layers"]) for kind in ("key", "value")]
        past_names = [f"past_key_values.{name}" for name in layer_names]
        prefix_names = [f"{PREFIX_KV}.{name}" for name in layer_names]
        present_names = [f"present.{name}" for name in layer_names]
        named = {
            "inputs_embeds": (
                torch.randn(BATCH, LENGTH, sizes["hidden_size"], dtype=dtype),
                {0: "batch", 1: "sequence"},
            ),
            "position_ids": position_ids,
            "attention_mask": (torch.ones(BATCH, PREFIX + PAST, dtype=torch.int64), {0: "batch", 1: "total"}),
            **extra,
            CACHE_POSITION: (torch.tensor([WRITE_AT]), {}),  # the chunk fills the buffer's last LENGTH slots
        }
        inputs = (
            *(tensor for tensor, _ in named.values()),
            *(torch.randn(BATCH, kv_heads, PAST, head_dim, dtype=dtype) for _ in past_names),
            *(torch.randn(1, kv_heads, PREFIX, head_dim, dtype=dtype) for _ in prefix_names),
        )
        axes = {name: dynamic for name, (_, dynamic) in named.items()} | {"logits": {0: "batch"}}
        axes |= {name: {0: "batch", 2: "past"} for name in past_names}
        axes |= {name: {2: "prefix"} for name in prefix_names}  # batch 1: one copy for all sequences
        axes |= {name: {0: "batch", 2: "past"} for name in present_names}  # the past buffer, written
        return Graph(decoder, inputs, [*named, *past_names, *prefix_names], ["logits", *present_names], axes)

    def role_of(self, parameter: str) -> str:
        """The role whose graph holds a state-dict entry; raises on a name it does not know. A family adds
        its vision tower's prefixes."""
        if parameter.startswith("model.language_model.embed_tokens."):
            return "embed"
        if parameter.startswith(("model.language_model.", "lm_head.")):
            return "decoder"
        raise ValueError(f"parameter {parameter!r} belongs to no exported graph")

    def sizes(self) -> dict:
        """Model sizes the runtime needs to build its inputs; a family adds its own to these text sizes."""
        text = self.text
        return {
            "num_layers": text["num_hidden_layers"],
            "hidden_size": text["hidden_size"],
            "num_attention_heads": text["num_attention_heads"],
            "num_key_value_heads": text["num_key_value_heads"],
            "head_dim": text.get("head_dim") or text["hidden_size"] // text["num_attention_heads"],
            "vocab_size": text["vocab_size"],
            "max_position_embeddings": text.get("max_position_embeddings", 32768),
        }

    @abstractmethod
    def tokens(self) -> dict[str, int | list[int]]:
        """Token ids the runtime needs (image placeholder, eos, ...)."""

    def image_config(self) -> ImageConfig:
        """The manifest's `image` section: the preprocessing constants the engine's family prepares
        images with, as the reference runtime reads them from the same checkpoint."""
        return self.image


def attention_bias(allowed: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """An additive attention mask: 0 where `allowed`, the dtype's lowest value elsewhere."""
    return torch.where(allowed, 0.0, torch.finfo(dtype).min).to(dtype)


class EmbedTokens(nn.Module):
    def __init__(self, embed: nn.Embedding) -> None:
        super().__init__()
        self.embed = embed

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:  # (B, S) -> (B, S, H)
        return self.embed(input_ids)


SHARED_PREFIX = "sparc_shared_prefix"  # the attention implementation the decoder graphs are traced with


def shared_prefix_attention(
    module: nn.Module,
    query: torch.Tensor,  # (B, heads, S, d)
    key: torch.Tensor,  # (B, kv_heads, L, d): the sequences' own KV buffer, the chunk written
    value: torch.Tensor,  # (B, kv_heads, L, d)
    attention_mask: torch.Tensor,  # (B, 1, S, P + L) additive: the prefix's P columns first
    scaling: float,
    dropout: float = 0.0,
    *,
    flat_cache: FlatCache,  # the shared prefix (1, kv_heads, P, d) and the traced sizes
    **kwargs,
) -> tuple[torch.Tensor, None]:
    """transformers' eager attention over [shared prefix | own KV], the prefix held once for all B rows.

    The `groups` query heads of one KV head are taken as rows of one matrix, (B, kv_heads, groups * S, d),
    so the own keys are read as they are, never repeated per query head. Scores against the prefix are one
    batch-1 problem: the B * groups * S query rows of a KV head meet its one copy of the prefix keys in a
    single MatMul (shared-prefix, "cascade" or Hydragen attention), so the prefix is read once per step,
    not B times. One softmax over the concatenated scores keeps it exact (eager's math, fp32 softmax).

    Only static sizes (heads, head_dim) and the cache's sizes, traced once per graph, shape the reshapes:
    every layer's shape arithmetic is then the same nodes, which onnxruntime merges (common subexpression
    elimination) instead of running a chain of Shape/Gather/Concat per reshape and layer.
    """
    prefix_key = flat_cache.prefix[2 * module.layer_idx]
    prefix_value = flat_cache.prefix[2 * module.layer_idx + 1]
    batch, length, prefix = flat_cache.batch, flat_cache.length, flat_cache.prefix_length
    kv_heads, groups = module.config.num_key_value_heads, module.num_key_value_groups
    head_dim = module.head_dim
    rows = groups * length  # query rows per KV head and sequence

    grouped = query.reshape(batch, kv_heads, rows, head_dim)  # query head h = kv head * groups + g
    as_prefix_rows = grouped.transpose(0, 1).reshape(1, kv_heads, -1, head_dim)  # (1, kv_heads, B * rows, d)
    prefix_scores = torch.matmul(as_prefix_rows, prefix_key.transpose(2, 3))  # (1, kv_heads, B * rows, P)
    prefix_scores = prefix_scores.reshape(kv_heads, batch, rows, -1).transpose(0, 1)  # (B, kv_heads, rows, P)
    own_scores = torch.matmul(grouped, key.transpose(2, 3))  # (B, kv_heads, rows, L)
    scores = torch.cat([prefix_scores, own_scores], dim=-1) * scaling
    mask = attention_mask.repeat(1, 1, groups, 1)  # (B, 1, rows, P + L): row g * S + s is query s
    weights = torch.softmax(scores + mask, dim=-1, dtype=torch.float32).to(query.dtype)
    # -1, not P: with an empty prefix the other sizes still give it (0)
    prefix_weights = weights[..., :prefix].transpose(0, 1).reshape(1, kv_heads, batch * rows, -1)
    from_prefix = torch.matmul(prefix_weights, prefix_value)  # (1, kv_heads, B * rows, d)
    from_prefix = from_prefix.reshape(kv_heads, batch, rows, head_dim).transpose(0, 1)
    output = from_prefix + torch.matmul(weights[..., prefix:], value)  # (B, kv_heads, rows, d)
    heads = kv_heads * groups
    return output.reshape(batch, heads, length, head_dim).transpose(
        1, 2
    ).contiguous(), None  # (B, S, heads, d)


AttentionInterface.register(SHARED_PREFIX, shared_prefix_attention)


@torch.library.custom_op("sparc::write_kv", mutates_args=())
def write_kv(buffer: torch.Tensor, index: torch.Tensor, chunk: torch.Tensor) -> torch.Tensor:
    """`buffer` (B, kv_heads, L, d) with `chunk` (B, kv_heads, S, d) written at `index` (B, kv_heads, S, 3),
    (row, head, slot) triples: ONNX ScatterND, which writes in place when its output is its input's buffer."""
    written = buffer.clone()
    written[index.unbind(-1)] = chunk
    return written


def _write_kv_symbolic(g, buffer, index, chunk):  # the TorchScript exporter's graph context and values
    return g.op("ScatterND", buffer, index, chunk).setType(buffer.type())


register_custom_op_symbolic("sparc::write_kv", _write_kv_symbolic, 1)


class FlatCache:
    """The one Cache method a decoder layer calls, over flat past tensors; collects the presents.

    `kv` is what the decoder graph takes after its named inputs: the own KV buffer per layer (B, n_kv_heads,
    L, head_dim), then the shared prefix KV per layer (1, n_kv_heads, P, head_dim). The chunk of S tokens
    goes into the buffer at `cache_position` (1,). The sizes the layers' reshapes need are traced here,
    once for all layers.
    """

    def __init__(
        self, inputs_embeds: torch.Tensor, cache_position: torch.Tensor, kv: tuple[torch.Tensor, ...]
    ):
        half = len(kv) // 2
        self.past, self.prefix = kv[:half], kv[half:]  # key0, value0, key1, value1, ... each
        self.batch, self.length = inputs_embeds.shape[0], inputs_embeds.shape[1]
        self.prefix_length = self.prefix[0].shape[2]
        slots = cache_position + torch.arange(self.length)  # (S,) the chunk's slots in the own buffer
        self.query_at = slots + self.prefix_length  # (S,) ... in [prefix | own], the keys' order
        rows = torch.arange(self.batch)[:, None, None]
        heads = torch.arange(self.past[0].shape[1])[None, :, None]
        self.index = torch.stack(
            torch.broadcast_tensors(rows, heads, slots[None, None, :]), dim=-1
        )  # (B, h, S, 3)
        self.present: list[torch.Tensor] = []

    def update(self, key: torch.Tensor, value: torch.Tensor, layer_idx: int, *args, **kwargs):
        key = torch.ops.sparc.write_kv(
            self.past[2 * layer_idx], self.index, key
        )  # (B, n_kv_heads, L, head_dim)
        value = torch.ops.sparc.write_kv(self.past[2 * layer_idx + 1], self.index, value)
        self.present += [key, value]
        return key, value


class TextDecoder(nn.Module):
    """transformers' text model + lm_head over inputs_embeds with the KV in and out as flat tensors.

    A family's `decode` takes (inputs_embeds, position_ids, attention_mask, <its extra input>,
    cache_position, *kv), runs the layers with its own rope and mask (over prefix + past buffer) over a
    FlatCache, passing the layers `flat_cache=cache`, and ends in `logits_and_present`. `forward` runs it
    with the layers' attention switched to `shared_prefix_attention`.
    """

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.text = model.model.language_model
        self.lm_head = model.lm_head

    def forward(self, *inputs: torch.Tensor) -> tuple[torch.Tensor, ...]:
        with _attention_implementation(self.text.config, SHARED_PREFIX):
            return self.decode(*inputs)

    def decode(self, *inputs: torch.Tensor) -> tuple[torch.Tensor, ...]:
        raise NotImplementedError

    @staticmethod
    def causal(cache: FlatCache, total: int) -> torch.Tensor:
        """(S, total) bool: the chunk's S queries see the keys up to themselves in [prefix | own buffer],
        so never the buffer's unwritten tail."""
        return torch.arange(total)[None, :] <= cache.query_at[:, None]

    def logits_and_present(self, hidden: torch.Tensor, cache: FlatCache) -> tuple[torch.Tensor, ...]:
        logits = self.lm_head(self.text.norm(hidden[:, -1]))  # (B, vocab): only the last position is sampled
        return (logits, *cache.present)


@contextlib.contextmanager
def _attention_implementation(config, name: str) -> Iterator[None]:
    """Switch a (text) config's attention function while tracing, and back: the model is left as it was."""
    before = config._attn_implementation
    config._attn_implementation = name
    try:
        yield
    finally:
        config._attn_implementation = before

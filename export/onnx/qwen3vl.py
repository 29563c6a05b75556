"""Qwen3-VL as three ONNX graphs: vision tower, token embeddings, text decoder with KV cache and DeepStack.

The wrappers call transformers' own submodules (so the weights and the layer math are transformers'),
but own the glue that does not trace: data-dependent shapes and Python loops over images.

vision   pixel patches + host-computed position tables + per-patch frame ids
         -> merged image embeddings (N/merge², H) and stacked DeepStack features (n_deep, N/merge², H).
         transformers derives the tables from grid_thw with `.tolist()`/`.item()`, which bakes one image
         size into a traced graph; taking them as inputs (runtimes/families/qwen3vl.py computes them) gives
         one graph for every image size. Attention stays inside each frame (export/onnx/attention.py):
         one frame, what the runtime sends, runs onnxruntime's fused MultiHeadAttention with no mask and
         no (heads, N, N) scores; several frames in one run fall back to a block mask built in the graph
         from the frame ids (an O(N) input rather than an (N, N) bias from the host).
embed    input_ids (B, S) -> (B, S, H). A graph rather than a numpy table so that it runs where the
         decoder runs (the CUDA EP keeps the table on the GPU) and the bundle holds only ONNX files.
decoder  inputs_embeds, M-RoPE position_ids (3, B, S), attention_mask (B, prefix+past+S), dense DeepStack
         features (n_deep, B, S, H; zeros off image tokens), cache_position, past KV buffer and shared prefix
         KV (batch 1) per layer (export/onnx/base.py) -> logits of the LAST position (B, vocab) and present
         KV per layer. Only the last position is ever sampled; projecting the whole prompt to the vocabulary
         would cost S x vocab for nothing.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn
from transformers.models.qwen3_vl.modeling_qwen3_vl import apply_rotary_pos_emb_vision

from export.onnx.attention import frame_attention
from export.onnx.base import (
    BATCH,
    LENGTH,
    PREFIX,
    WRITE_AT,
    FlatCache,
    Graph,
    OnnxFamily,
    TextDecoder,
    attention_bias,
)


class VisionCore(nn.Module):
    """Qwen3VLVisionModel.forward with the position tables as inputs and attention within each frame."""

    def __init__(self, visual: nn.Module) -> None:
        super().__init__()
        self.visual = visual

    def forward(
        self,
        pixel_values: torch.Tensor,  # (N, 3 * temporal * patch * patch), N patches of all images
        interp_indices: torch.Tensor,  # (N, 4) int64 rows of the learned position grid
        interp_weights: torch.Tensor,  # (N, 4) bilinear weights
        rotary_pos_ids: torch.Tensor,  # (N, 2) int64 (row, col) in patches
        frame_ids: torch.Tensor,  # (N,) int64: patches attend only within their own frame
    ) -> tuple[torch.Tensor, torch.Tensor]:
        visual = self.visual
        hidden = self._patch_embed(visual.patch_embed.proj, pixel_values)  # (N, D)
        positions = (visual.pos_embed(interp_indices) * interp_weights[:, :, None].to(hidden.dtype)).sum(1)
        hidden = hidden + positions
        cos, sin = visual.rotary_pos_emb(hidden, rotary_pos_ids)  # (N, head_dim) each
        deepstack = []
        for index, block in enumerate(visual.blocks):
            hidden = hidden + self._attention(block.attn, block.norm1(hidden), cos, sin, frame_ids)
            hidden = hidden + block.mlp(block.norm2(hidden))
            if index in visual.deepstack_visual_indexes:
                merger = visual.deepstack_merger_list[visual.deepstack_visual_indexes.index(index)]
                deepstack.append(merger(hidden))  # (N / merge², H)
        return visual.merger(hidden), torch.stack(deepstack)

    @staticmethod
    def _patch_embed(proj: nn.Conv3d, pixel_values: torch.Tensor) -> torch.Tensor:
        """transformers' Conv3d over patches, as the one matrix product it is: its kernel and stride are the
        patch, and the pixels come cut into patches in the kernel's (channel, time, row, column) order.
        onnxruntime's CPU Conv takes about 7 times as long as a Gemm for the same product (7600 patches:
        335 against 48 ms)."""
        weight = proj.weight.reshape(proj.out_channels, -1)  # (D, C * T * P * P)
        return nn.functional.linear(pixel_values.to(weight.dtype), weight, proj.bias)

    @staticmethod
    def _attention(
        attn: nn.Module, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, frame_ids: torch.Tensor
    ) -> torch.Tensor:
        n = x.shape[0]
        q, k, v = attn.qkv(x).reshape(n, 3, attn.num_heads, -1).permute(1, 0, 2, 3).unbind(0)  # (N, h, d)
        q, k = apply_rotary_pos_emb_vision(q, k, cos, sin)
        out = frame_attention(q, k, v, frame_ids, attn.num_heads, attn.scaling)  # (N, h * d)
        return attn.proj(out)


class Decoder(TextDecoder):
    """Qwen3VLTextModel + lm_head over inputs_embeds with explicit M-RoPE positions and KV in/out."""

    def decode(
        self,
        inputs_embeds: torch.Tensor,  # (B, S, H)
        position_ids: torch.Tensor,  # (3, B, S) int64: temporal, height, width rope positions
        attention_mask: torch.Tensor,  # (B, prefix + past) int64: 1 = attend
        deepstack_embeds: torch.Tensor,  # (n_deep, B, S, H): added after layer i; zeros off image tokens
        cache_position: torch.Tensor,  # (1,) int64: the chunk's first slot in the past buffer
        *kv: torch.Tensor,  # past buffer (B, n_kv_heads, past, head_dim), then shared prefix (1, ...): 2 per layer
    ) -> tuple[torch.Tensor, ...]:
        cache = FlatCache(inputs_embeds, cache_position, kv)
        hidden = inputs_embeds
        causal = self.causal(cache, attention_mask.shape[1])  # (S, total)
        allowed = causal[None, None] & attention_mask[:, None, None, :].bool()  # (B, 1, S, total)
        mask = attention_bias(allowed, hidden.dtype)
        rotary = self.text.rotary_emb(hidden, position_ids)  # cos, sin: (B, S, head_dim)
        for index, layer in enumerate(self.text.layers):
            hidden = layer(
                hidden,
                position_embeddings=rotary,
                attention_mask=mask,
                past_key_values=cache,
                flat_cache=cache,
            )
            if index < deepstack_embeds.shape[0]:
                hidden = hidden + deepstack_embeds[index]
        return self.logits_and_present(hidden, cache)


class Qwen3VLOnnx(OnnxFamily):
    architectures = ("Qwen3VLForConditionalGeneration",)

    def __init__(self, config: dict, model_dir: Path) -> None:
        super().__init__(config, model_dir)
        self.vision = config["vision_config"]

    def vision_graph(self, model: nn.Module, dtype: torch.dtype) -> Graph:
        from runtimes.families.qwen3vl import qwen_vision_tables

        # Two images of different non-square grids: nothing about one size can be baked into the trace.
        sizes, merge = self.sizes(), self.vision["spatial_merge_size"]
        grids = [(1, 2 * merge, 3 * merge), (1, 3 * merge, merge)]
        tables = qwen_vision_tables(grids, num_grid_per_side=sizes["num_grid_per_side"], merge_size=merge)
        n = int(tables.cu_seqlens[-1])
        patch = (
            self.vision.get("in_channels", 3)
            * self.vision["temporal_patch_size"]
            * self.vision["patch_size"] ** 2
        )
        frame_ids = torch.repeat_interleave(
            torch.arange(len(grids)), torch.tensor([h * w for _, h, w in grids])
        )
        inputs = (
            torch.randn(n, patch, dtype=dtype),
            torch.from_numpy(tables.interp_indices),
            torch.from_numpy(tables.interp_weights).to(dtype),
            torch.from_numpy(tables.rotary_pos_ids),
            frame_ids,
        )
        names = ["pixel_values", "interp_indices", "interp_weights", "rotary_pos_ids", "frame_ids"]
        axes = {name: {0: "patches"} for name in names}
        axes |= {"image_embeds": {0: "tokens"}, "deepstack_features": {1: "tokens"}}
        return Graph(
            VisionCore(model.model.visual), inputs, names, ["image_embeds", "deepstack_features"], axes
        )

    def decoder_graph(self, model: nn.Module, dtype: torch.dtype) -> Graph:
        sizes = self.sizes()
        first = (
            PREFIX + WRITE_AT
        )  # the chunk's first position, after the prefix and the buffer's written slots
        positions = torch.arange(first, first + LENGTH).expand(3, BATCH, LENGTH).contiguous()
        deepstack = torch.zeros(sizes["num_deepstack"], BATCH, LENGTH, sizes["hidden_size"], dtype=dtype)
        return self.kv_decoder_graph(
            Decoder(model),
            dtype,
            position_ids=(positions, {1: "batch", 2: "sequence"}),
            extra={"deepstack_embeds": (deepstack, {1: "batch", 2: "sequence"})},
        )

    def role_of(self, parameter: str) -> str:
        return "vision" if parameter.startswith("model.visual.") else super().role_of(parameter)

    def tokens(self) -> dict[str, int | list[int]]:
        return {
            "image_token_id": self.config["image_token_id"],
            "vision_start_token_id": self.config["vision_start_token_id"],
            "vision_end_token_id": self.config["vision_end_token_id"],
        }

    def sizes(self) -> dict:
        return {
            **super().sizes(),
            "num_deepstack": len(self.vision.get("deepstack_visual_indexes", [])),
            "num_grid_per_side": int(round(self.vision["num_position_embeddings"] ** 0.5)),
            "spatial_merge_size": self.vision["spatial_merge_size"],
        }

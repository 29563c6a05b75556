"""Molmo2 as three ONNX graphs: vision tower + pooling adapter, token embeddings, text decoder with KV cache.

The wrappers call transformers' own submodules (so the weights and the layer math are transformers'), but
own the glue that does not trace: the output-capturing hooks of the vision tower, the boolean filter and
`.tolist()` split after the adapter, and the mask builder.

vision   crops (n_crops, 729, 14*14*3) + pooling rows (T, 4) of patch indices (-1 pads)
         -> image features (T, H), one per <im_patch> token, ADDED to those tokens' embeddings by the host.
         The crop count and the token count are free axes; every crop has the checkpoint's crop size
         (378 px of 14 px patches in the released ones), so nothing else varies.
embed    input_ids (B, S) -> (B, S, H), the text rows and the additional (image-token) rows.
decoder  inputs_embeds (B, S, H), 1-D position_ids (B, S), attention_mask (B, prefix+past), token_types
         (B, prefix+past; 1 = image token), cache_position, past KV buffer and shared prefix KV per layer
         (export/onnx/base.py) -> logits of the LAST position and present KV.
         Image tokens attend to each other in both directions wherever they are in the sequence
         (transformers' `block_sequence_ids` of the prefill chunk); text stays causal. On a decoding step
         every query is text, so the block has no effect there and token_types may be zeros.

The manifest's `model` section carries, besides the sizes, the checkpoint's processor switches
(`processor`: image_use_col_tokens, use_single_crop_col_tokens, use_single_crop_start_token - the token
layout runtimes/families/molmo2.py builds). Its `image` section holds the preprocessing constants (crop and
patch size, overlap margins, pooling, max crops, mean and std) as the reference runtime reads them from
the checkpoint (runtimes/torch_ref/molmo2.py), which refuses constants that contradict each other.

The class registers itself for "Molmo2ForConditionalGeneration"; `export/onnx/__init__.py` imports it.
"""

from __future__ import annotations

import torch
from torch import nn

from export.onnx.base import (
    BATCH,
    LENGTH,
    PAST,
    PREFIX,
    WRITE_AT,
    FlatCache,
    Graph,
    OnnxFamily,
    TextDecoder,
    attention_bias,
)
from runtimes.torch_ref.checkpoint import read_json

PROCESSOR_SWITCHES = ("image_use_col_tokens", "use_single_crop_col_tokens", "use_single_crop_start_token")


class VisionCore(nn.Module):
    """Molmo2Model.get_image_features for any number of crops, one feature per pooling row."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.tower = model.model.vision_tower
        self.adapter = model.model.multi_modal_projector
        self.layers = list(model.config.adapter_config.vision_feature_layer)  # negative: from the end

    def forward(
        self,
        pixel_values: torch.Tensor,  # (n_crops, 729, 588) normalized pixels, patch-major
        image_token_pooling: torch.Tensor,  # (T, 4) int64 indices into the flattened (crop, patch) axis
    ) -> torch.Tensor:
        tower = self.tower
        hidden = tower.patch_embedding(pixel_values) + tower.positional_embedding[None]  # (C, 729, D)
        states = [hidden]  # states[0]: the embeddings, states[i + 1]: after ViT layer i
        for layer in tower.layers:
            hidden = layer(hidden, None)
            states.append(hidden)
        features = torch.cat([states[i + 1 if i >= 0 else i] for i in self.layers], dim=-1)  # (C, 729, D*k)
        flat = features.reshape(-1, features.shape[-1])
        valid = image_token_pooling >= 0  # (T, 4)
        patches = flat[image_token_pooling.clamp(min=0)] * valid[..., None].to(flat.dtype)  # (T, 4, D*k)
        count = valid.sum(-1).clamp(min=1).to(flat.dtype)  # (T,)
        query = patches.sum(1, keepdim=True) / count[:, None, None]  # (T, 1, D*k): mean of valid patches
        bias = attention_bias(valid, flat.dtype)[:, None, None, :]
        pooled, _ = self.adapter.image_pooling_2d(query, patches, attention_mask=bias)  # (T, 1, D)
        return self.adapter.image_projector(pooled[:, 0])  # (T, H)


class Decoder(TextDecoder):
    """Molmo2TextModel + lm_head over inputs_embeds with 1-D positions, the image block mask, KV in/out."""

    def decode(
        self,
        inputs_embeds: torch.Tensor,  # (B, S, H)
        position_ids: torch.Tensor,  # (B, S) int64
        attention_mask: torch.Tensor,  # (B, prefix + past) int64: 1 = attend
        token_types: torch.Tensor,  # (B, prefix + past) int64: 1 = image token (mm_token_type_ids)
        cache_position: torch.Tensor,  # (1,) int64: the chunk's first slot in the past buffer
        *kv: torch.Tensor,  # past buffer (B, n_kv_heads, past, head_dim), then shared prefix (1, ...): 2 per layer
    ) -> tuple[torch.Tensor, ...]:
        cache = FlatCache(inputs_embeds, cache_position, kv)
        hidden = inputs_embeds
        causal = self.causal(cache, attention_mask.shape[1])  # (S, total)
        image = token_types == 1  # (B, total)
        both_image = image.index_select(1, cache.query_at)[:, :, None] & image[:, None, :]  # (B, S, total)
        allowed = (causal[None] | both_image) & attention_mask[:, None, :].bool()
        mask = attention_bias(allowed[:, None], hidden.dtype)
        rotary = {
            "scaled": self.text.rotary_emb(hidden, position_ids),
            "unscaled": self.text.rotary_emb_unscaled(hidden, position_ids),
        }
        for layer, rope in zip(self.text.layers, self.text.rope_types):
            hidden = layer(
                hidden,
                position_embeddings=rotary[rope],
                attention_mask=mask,
                past_key_values=cache,
                flat_cache=cache,
            )
        return self.logits_and_present(hidden, cache)


class Molmo2Onnx(OnnxFamily):
    architectures = ("Molmo2ForConditionalGeneration",)

    def vision_graph(self, model: nn.Module, dtype: torch.dtype) -> Graph:
        # 3 crops and 5 tokens (one with padding slots): no count can be mistaken for another.
        side, patch = self.image.crop_size // self.image.patch_size, self.image.patch_size
        per_crop = side * side
        pixels = torch.randn(3, per_crop, patch * patch * 3, dtype=dtype)
        pooling = torch.tensor(
            [
                [0, 1, side, side + 1],
                [per_crop - 1, -1, 2 * per_crop + 1, -1],
                [2, 3, side + 2, side + 3],
                [5, 6, 7, 8],
                [9, -1, -1, -1],
            ]
        )
        axes = {
            "pixel_values": {0: "crops"},
            "image_token_pooling": {0: "tokens"},
            "image_features": {0: "tokens"},
        }
        names = ["pixel_values", "image_token_pooling"]
        return Graph(VisionCore(model), (pixels, pooling), names, ["image_features"], axes)

    def decoder_graph(self, model: nn.Module, dtype: torch.dtype) -> Graph:
        first = (
            PREFIX + WRITE_AT
        )  # the chunk's first position, after the prefix and the buffer's written slots
        positions = torch.arange(first, first + LENGTH).expand(BATCH, LENGTH).contiguous()
        types = torch.zeros(BATCH, PREFIX + PAST, dtype=torch.int64)
        types[:, 3:8] = 1  # image tokens across both cache boundaries (prefix | past | chunk)
        return self.kv_decoder_graph(
            Decoder(model),
            dtype,
            position_ids=(positions, {0: "batch", 1: "sequence"}),
            extra={"token_types": (types, {0: "batch", 1: "total"})},
        )

    def role_of(self, parameter: str) -> str:
        if parameter.startswith(("model.vision_tower.", "model.multi_modal_projector.")):
            return "vision"
        return super().role_of(parameter)

    def tokens(self) -> dict[str, int | list[int]]:
        return {
            "image_token_id": self.config["image_patch_id"],  # <im_patch>: features are added to it
            "image_start_token_id": self.config["image_start_token_id"],
            "low_res_image_start_token_id": self.config["low_res_image_start_token_id"],
            "image_end_token_id": self.config["image_end_token_id"],
        }

    def sizes(self) -> dict:
        processor = read_json(self.model_dir / "processor_config.json")
        return {
            **super().sizes(),
            # a switch left unset (None) means transformers' default, as in runtimes/families/molmo2.py
            "processor": {key: processor.get(key) for key in PROCESSOR_SWITCHES},
        }

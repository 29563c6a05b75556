"""Molmo2 as three ONNX graphs: vision tower + pooling adapter, token embeddings, text decoder with KV cache.

The wrappers call transformers' own submodules (so the weights and the layer math are transformers'), but
own the glue that does not trace: the output-capturing hooks of the vision tower, the boolean filter and
`.tolist()` split after the adapter, and the mask builder.

vision   crops (n_crops, 729, 14*14*3) + pooling rows (T, 4) of patch indices (-1 pads)
         -> image features (T, H), one per <im_patch> token, ADDED to those tokens' embeddings by the host.
         The crop count and the token count are free axes; every crop is 378 px, so nothing else varies.
embed    input_ids (B, S) -> (B, S, H), the text rows and the additional (image-token) rows.
decoder  inputs_embeds (B, S, H), 1-D position_ids (B, S), attention_mask (B, past+S), token_types
         (B, past+S; 1 = image token) and past KV per layer -> logits of the LAST position and present KV.
         Image tokens attend to each other in both directions wherever they are in the sequence
         (transformers' `block_sequence_ids` of the prefill chunk); text stays causal. On a decoding step
         every query is text, so the block has no effect there and token_types may be zeros.

The manifest's `model` section carries, besides the sizes, the checkpoint's processor switches
(`processor`: image_use_col_tokens, use_single_crop_col_tokens, use_single_crop_start_token - the token
layout runtimes/molmo2_layout.py builds) and its image preprocessing constants (`preprocessing`), which
must be the ones the engine implements (the export refuses others, as the reference runtime does).

The class registers itself for "Molmo2ForConditionalGeneration"; `export/onnx/__init__.py` imports it.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import nn

from export.onnx.base import Graph, OnnxFamily
from export.onnx.qwen3vl import EmbedTokens, _FlatCache
from runtimes.base import RuntimeInputError
from runtimes.torch_molmo2 import SUPPORTED_PREPROCESSING

CROP_PATCHES = 27 * 27  # patches per 378 px crop (14 px patches)
PROCESSOR_SWITCHES = ("image_use_col_tokens", "use_single_crop_col_tokens", "use_single_crop_start_token")
PREPROCESSING = (*SUPPORTED_PREPROCESSING, "max_crops", "image_mean", "image_std")


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
        bias = torch.where(valid, 0.0, torch.finfo(flat.dtype).min).to(flat.dtype)[:, None, None, :]
        pooled, _ = self.adapter.image_pooling_2d(query, patches, attention_mask=bias)  # (T, 1, D)
        return self.adapter.image_projector(pooled[:, 0])  # (T, H)


class Decoder(nn.Module):
    """Molmo2TextModel + lm_head over inputs_embeds with 1-D positions, the image block mask, KV in/out."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.text = model.model.language_model
        self.lm_head = model.lm_head

    def forward(
        self,
        inputs_embeds: torch.Tensor,  # (B, S, H)
        position_ids: torch.Tensor,  # (B, S) int64
        attention_mask: torch.Tensor,  # (B, past + S) int64: 1 = attend
        token_types: torch.Tensor,  # (B, past + S) int64: 1 = image token (mm_token_type_ids)
        *past: torch.Tensor,  # 2 per layer: (B, n_kv_heads, past, head_dim)
    ) -> tuple[torch.Tensor, ...]:
        cache = _FlatCache(past)
        hidden = inputs_embeds
        length, total = inputs_embeds.shape[1], attention_mask.shape[1]
        query_at = torch.arange(length, device=hidden.device) + (total - length)  # absolute positions
        causal = torch.arange(total, device=hidden.device)[None, :] <= query_at[:, None]  # (S, total)
        image = token_types == 1  # (B, total)
        both_image = image[:, -length:, None] & image[:, None, :]  # (B, S, total)
        allowed = (causal[None] | both_image) & attention_mask[:, None, :].bool()
        mask = torch.where(allowed[:, None], 0.0, torch.finfo(hidden.dtype).min).to(hidden.dtype)
        rotary = {
            "scaled": self.text.rotary_emb(hidden, position_ids),
            "unscaled": self.text.rotary_emb_unscaled(hidden, position_ids),
        }
        for layer, rope in zip(self.text.layers, self.text.rope_types):
            hidden = layer(
                hidden, position_embeddings=rotary[rope], attention_mask=mask, past_key_values=cache
            )
        logits = self.lm_head(self.text.norm(hidden[:, -1]))  # (B, vocab)
        return (logits, *cache.present)


class Molmo2Onnx(OnnxFamily):
    architectures = ("Molmo2ForConditionalGeneration",)
    roles = ("vision", "embed", "decoder")

    def __init__(self, config: dict) -> None:
        super().__init__(config)
        self.text = config["text_config"]
        self.checkpoint: Path | None = None  # known once a graph is built (see _read)

    def _read(self, name: str) -> dict:
        """A processor file of the checkpoint. The driver hands a family config.json only; the processor
        files sit next to it, in the directory transformers loaded the model from."""
        if self.checkpoint is None:
            raise RuntimeError("Molmo2Onnx reads the checkpoint's processor files only after graph()")
        path = self.checkpoint / name
        return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}

    def _preprocessing(self) -> dict:
        pre = self._read("preprocessor_config.json")
        problems = [
            f"{key}={pre[key]!r} (supported: {value!r})"
            for key, value in SUPPORTED_PREPROCESSING.items()
            if key in pre and pre[key] != value
        ]
        if problems:
            raise RuntimeInputError(
                f"{self.checkpoint}: unsupported Molmo2 preprocessing: {'; '.join(problems)}"
            )
        return {key: pre.get(key, SUPPORTED_PREPROCESSING.get(key)) for key in PREPROCESSING}

    def graph(self, model: nn.Module, role: str) -> Graph:
        self.checkpoint = Path(model.config.name_or_path)
        self._preprocessing()  # refuse pixels the engine cannot prepare before any graph is traced
        dtype = next(model.parameters()).dtype
        if role == "vision":
            # 3 crops and 5 tokens (one with padding slots): no count can be mistaken for another.
            pixels = torch.randn(3, CROP_PATCHES, 14 * 14 * 3, dtype=dtype)
            pooling = torch.tensor(
                [[0, 1, 27, 28], [700, -1, 1500, -1], [2, 3, 29, 30], [5, 6, 7, 8], [9, -1, -1, -1]]
            )
            axes = {
                "pixel_values": {0: "crops"},
                "image_token_pooling": {0: "tokens"},
                "image_features": {0: "tokens"},
            }
            names = ["pixel_values", "image_token_pooling"]
            return Graph(VisionCore(model), (pixels, pooling), names, ["image_features"], axes)
        if role == "embed":
            ids = torch.zeros((1, 5), dtype=torch.int64)
            axes = {"input_ids": {0: "batch", 1: "sequence"}, "inputs_embeds": {0: "batch", 1: "sequence"}}
            return Graph(
                EmbedTokens(model.get_input_embeddings()), (ids,), ["input_ids"], ["inputs_embeds"], axes
            )
        if role == "decoder":
            return self._decoder_graph(model, dtype)
        raise ValueError(f"unknown role {role!r}")

    def _decoder_graph(self, model: nn.Module, dtype: torch.dtype) -> Graph:
        sizes = self.sizes()
        batch, length, past = 2, 3, 4  # distinct sizes, so no axis is mistaken for another when traced
        kv_shape = (batch, sizes["num_key_value_heads"], past, sizes["head_dim"])
        past_names = [
            f"past_key_values.{i}.{kind}" for i in range(sizes["num_layers"]) for kind in ("key", "value")
        ]
        present_names = [name.replace("past_key_values", "present") for name in past_names]
        types = torch.zeros(batch, past + length, dtype=torch.int64)
        types[:, 2:6] = 1  # image tokens on both sides of the cache boundary
        inputs = (
            torch.randn(batch, length, sizes["hidden_size"], dtype=dtype),
            torch.arange(past, past + length).expand(batch, length).contiguous(),
            torch.ones(batch, past + length, dtype=torch.int64),
            types,
            *(torch.randn(kv_shape, dtype=dtype) for _ in past_names),
        )
        axes = {
            "inputs_embeds": {0: "batch", 1: "sequence"},
            "position_ids": {0: "batch", 1: "sequence"},
            "attention_mask": {0: "batch", 1: "total"},
            "token_types": {0: "batch", 1: "total"},
            "logits": {0: "batch"},
        }
        axes |= {name: {0: "batch", 2: "past"} for name in past_names}
        axes |= {name: {0: "batch", 2: "total"} for name in present_names}
        names = ["inputs_embeds", "position_ids", "attention_mask", "token_types", *past_names]
        return Graph(Decoder(model), inputs, names, ["logits", *present_names], axes)

    def role_of(self, parameter: str) -> str:
        if parameter.startswith(("model.vision_tower.", "model.multi_modal_projector.")):
            return "vision"
        if parameter.startswith("model.language_model.embed_tokens."):
            return "embed"
        if parameter.startswith(("model.language_model.", "lm_head.")):
            return "decoder"
        raise ValueError(f"parameter {parameter!r} belongs to no exported graph")

    def tokens(self) -> dict[str, int | list[int]]:
        return {
            "image_token_id": self.config["image_patch_id"],  # <im_patch>: features are added to it
            "image_start_token_id": self.config["image_start_token_id"],
            "low_res_image_start_token_id": self.config["low_res_image_start_token_id"],
            "image_end_token_id": self.config["image_end_token_id"],
        }

    def sizes(self) -> dict:
        processor = self._read("processor_config.json")
        return {
            "num_layers": self.text["num_hidden_layers"],
            "hidden_size": self.text["hidden_size"],
            "num_attention_heads": self.text["num_attention_heads"],
            "num_key_value_heads": self.text["num_key_value_heads"],
            "head_dim": self.text.get("head_dim")
            or self.text["hidden_size"] // self.text["num_attention_heads"],
            "vocab_size": self.text["vocab_size"],
            "max_position_embeddings": self.text.get("max_position_embeddings", 32768),
            # a switch left unset (None) means transformers' default, as in runtimes/molmo2_layout.py
            "processor": {key: processor.get(key) for key in PROCESSOR_SWITCHES},
            "preprocessing": self._preprocessing(),
        }

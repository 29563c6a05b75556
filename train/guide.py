"""The attention guide: two decoder heads are told where the target is while the perceive stage trains.

From scratch, the model must learn to attend to the target's few visual tokens among the view's 64 before
the coordinates it writes can depend on the image, and on benchmark scenes (objects of 1-3% among 3-8) it
does not within an hour of CPU. So, on every perceive sequence, an auxiliary loss asks a few heads of one
early decoder layer to put their attention, at every position that predicts a target token, on the tokens
the target covers: -log of that attention mass. The other heads and layers stay free. Measured with a
frozen stage-0 tower (README, "Where it stands"): the guided mass reaches 1.0 within 25 steps on single
objects and stays at 0.92-1.0 with 8.

That average hides where it fails: at the positions before the first coordinate digit, where the target can
only be found by what the question names it by (its colour), the heads spread evenly over all the objects,
and then follow whichever object the first digit happened to point at. The find term weighs those positions
alone (`GuideWeights.find`); the demo's last phase trains with it (train/demo.py, `FIND_PHASE`).

The mass is recomputed from the guided layer's input (its own q/k projections, norms and rope), for the
guided heads and the target-predicting queries alone, so the forward keeps its fused attention: asking
the model for all attention weights costs about half a step more.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from transformers.models.qwen3_vl.modeling_qwen3_vl import apply_rotary_pos_emb

from runtimes.torch_ref.family import TorchFamily
from train.examples import IGNORE, TrainingSequence, collate

LOOK_AT = "look_at"  # batch key: per row, the token indices the guided heads should attend to
FIND_THROUGH = "find_through"  # batch key: per row, TrainingSequence.find_through
GUIDE_KEYS = (LOOK_AT, FIND_THROUGH)

GUIDED_LAYER = 2
GUIDED_HEADS = 2  # heads 0 .. GUIDED_HEADS - 1


@dataclass(frozen=True)
class GuideWeights:
    """How much the guide adds to the model's loss: its mean -log mass over every target position of the
    guided rows, and over the positions before the first coordinate digit (the find term) alone."""

    everywhere: float = 0.5
    find: float = 0.0


def guided_batch(torch_family: TorchFamily, sequences: Sequence[TrainingSequence]) -> dict[str, Any]:
    """collate's batch, plus where each sequence's guided heads should look (empty: not guided)."""
    return {
        **collate(torch_family, sequences),
        LOOK_AT: [s.look_at for s in sequences],
        FIND_THROUGH: [s.find_through for s in sequences],
    }


class AttentionGuide:
    """Adds the guide's loss to a Qwen3-VL model's own on batches that carry LOOK_AT."""

    def __init__(self, model: torch.nn.Module, layer: int = GUIDED_LAYER, heads: int = GUIDED_HEADS) -> None:
        self.attention = model.model.language_model.layers[layer].self_attn
        self.heads = heads
        self.layer_input: tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor]] | None = None
        self.attention.register_forward_pre_hook(self._keep_input, with_kwargs=True)

    def _keep_input(self, module: torch.nn.Module, args: tuple, kwargs: dict) -> None:
        self.layer_input = (kwargs["hidden_states"], kwargs["position_embeddings"])

    def loss(
        self, model: torch.nn.Module, batch: dict[str, Any], weights: GuideWeights = GuideWeights()
    ) -> torch.Tensor:
        """The model's target loss + the guide's terms (GuideWeights) over the rows it guides."""
        look_at = batch.get(LOOK_AT, [])
        output = model(**{k: v for k, v in batch.items() if k not in GUIDE_KEYS})
        rows = [row for row, tokens in enumerate(look_at) if len(tokens)]
        if not rows:
            return output.loss
        masses = dict(zip(rows, self.masses(batch["labels"], look_at, rows)))
        loss = output.loss
        if weights.everywhere:
            loss = loss + weights.everywhere * _mean_surprise(masses.values())
        if weights.find:
            find_through = batch.get(FIND_THROUGH, [0] * len(look_at))
            finding = [masses[row][:, : find_through[row]] for row in rows if find_through[row]]
            if finding:
                loss = loss + weights.find * _mean_surprise(finding)
        return loss

    def masses(
        self, labels: torch.Tensor, look_at: Sequence[Sequence[int]], rows: Sequence[int]
    ) -> list[torch.Tensor]:
        """Per guided row, (heads, target queries): the guided heads' attention on its look_at tokens,
        from the latest forward."""
        if self.layer_input is None:
            raise RuntimeError("no forward has run through the guided layer")
        hidden, (cos, sin) = self.layer_input
        attention = self.attention
        shape = (*hidden.shape[:2], -1, attention.head_dim)
        queries = attention.q_norm(attention.q_proj(hidden).view(shape)).transpose(1, 2)
        keys = attention.k_norm(attention.k_proj(hidden).view(shape)).transpose(1, 2)
        groups = queries.shape[1] // keys.shape[1]  # query heads per KV head
        queries = queries[:, : self.heads]
        keys = keys[:, torch.arange(self.heads) // groups]
        queries, keys = apply_rotary_pos_emb(queries, keys, cos, sin)
        masses = []
        for row in rows:
            # a position predicts a target token when the next one is labelled (HF shifts labels by one)
            positions = (labels[row, 1:] != IGNORE).nonzero().squeeze(1)
            scores = queries[row][:, positions] @ keys[row].transpose(-1, -2) * attention.scaling
            later = torch.arange(keys.shape[2], device=scores.device)[None, :] > positions[:, None]
            weights = scores.masked_fill(later, float("-inf")).softmax(-1)
            masses.append(weights[..., torch.as_tensor(look_at[row], device=scores.device)].sum(-1))
        return masses


def _mean_surprise(masses: Iterable[torch.Tensor]) -> torch.Tensor:
    return torch.cat([-torch.log(m + 1e-6).flatten() for m in masses]).mean()

"""A random PEFT LoRA adapter for the tiny Qwen3-VL: stands in for a trained perception LoRA in tests.

It targets the text decoder's attention projections (q_proj, v_proj; the vision tower names its own
`qkv`), like a perception LoRA tuned on grounding would. peft initializes B to zero, which merges to the
base weights; both factors are drawn at random here so the merged model really differs.
"""

from __future__ import annotations

from pathlib import Path

import torch
from peft import LoraConfig, get_peft_model
from transformers import AutoModelForImageTextToText


def build_tiny_lora(model_dir: str | Path, out_dir: str | Path, *, seed: int = 0, rank: int = 4) -> Path:
    """Write a PEFT adapter directory (adapter_config.json + adapter_model.safetensors) and return it."""
    model = AutoModelForImageTextToText.from_pretrained(model_dir, dtype=torch.float32)
    config = LoraConfig(r=rank, lora_alpha=2 * rank, target_modules=["q_proj", "v_proj"], lora_dropout=0.0)
    peft_model = get_peft_model(model, config)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in sorted(peft_model.named_parameters(), key=lambda item: item[0]):
            if "lora_" in name:
                param.copy_(0.1 * torch.randn(param.shape, generator=generator))
    out = Path(out_dir)
    peft_model.save_pretrained(out)
    return out

"""Molmo2 as a hybrid GGUF bundle: the Qwen3 text decoder for llama.cpp, the vision side as ONNX graphs.

    bundle/
      manifest.yaml, tokenizer.json
      base/model-<quant>.gguf   # text decoder, llama.cpp's `qwen3` architecture, text vocabulary only
      base/vision.onnx          # crops + pooling rows -> one feature per <im_patch> (export/onnx/molmo2.py)
      base/embed.onnx           # token ids -> embeddings, image-token rows included

llama.cpp has no Molmo2 converter and libmtmd no Molmo2 projector, but for the released configurations
Molmo2's text decoder IS Qwen3 (per-head q/k RMSNorm, default RoPE on every layer, no attention bias,
pre-norm, SiLU gated MLP), so its weights are written here with gguf's writer under Qwen3's tensor names.
Anything else (another q/k norm, post-norm, biases, rope scaling on some layers only) is refused: llama.cpp
would run it as Qwen3 and answer wrongly. Image tokens never enter the GGUF by id - the runtime hands
llama.cpp their embeddings (embed graph + vision features, runtimes/llamacpp/molmo2.py) - so only the
`vocab_size` text rows (the lm_head's) are written.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np

from engine.errors import UserError
from export.gguf.base import GgufFamily, GgufJob, log, quantize, versions
from runtimes.bundle import MANIFEST, Manifest, write_manifest

ARCHITECTURE = "Molmo2ForConditionalGeneration"
ROLES = ("vision", "embed")  # the ONNX graphs the runtime runs besides the text GGUF
# llama.cpp's qwen3 tensor names for transformers' Molmo2 text-model names (per layer, then global)
LAYER_TENSORS = {
    "input_layernorm": "attn_norm",
    "self_attn.q_proj": "attn_q",
    "self_attn.k_proj": "attn_k",
    "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output",
    "self_attn.q_norm": "attn_q_norm",
    "self_attn.k_norm": "attn_k_norm",
    "post_attention_layernorm": "ffn_norm",
    "mlp.gate_proj": "ffn_gate",
    "mlp.up_proj": "ffn_up",
    "mlp.down_proj": "ffn_down",
}
TOKEN_NORMAL, TOKEN_CONTROL, TOKEN_USER_DEFINED, TOKEN_UNUSED = 1, 3, 4, 5  # llama.cpp's token types


def qwen3_mismatches(config: dict) -> list[str]:
    """Why this checkpoint's text decoder is not the plain Qwen3 llama.cpp runs ([] when it is)."""
    text = config.get("text_config")
    if not isinstance(text, dict):
        return ["config.json has no text_config"]
    rope = text.get("rope_parameters") or {}
    layers = list(range(int(text.get("num_hidden_layers", 0))))
    checks = {
        "qk_norm_type": (text.get("qk_norm_type"), "qwen3"),
        "norm_after": (bool(text.get("norm_after")), False),
        "attention_bias": (bool(text.get("attention_bias")), False),
        "hidden_act": (text.get("hidden_act"), "silu"),
        "rope_type": (rope.get("rope_type", "default"), "default"),
        # a layer outside rope_scaling_layers uses other RoPE frequencies; llama.cpp has one set
        "rope_scaling_layers": (sorted(text.get("rope_scaling_layers") or layers), layers),
    }
    return [f"{key}={got!r} (needs {want!r})" for key, (got, want) in checks.items() if got != want]


def refusal(config: dict) -> str | None:
    problems = qwen3_mismatches(config)
    if not problems:
        return None
    return (
        "the hybrid export runs Molmo2's text decoder as llama.cpp's Qwen3, and this checkpoint's differs: "
        + "; ".join(problems)
        + " (export it to ONNX instead)"
    )


def tokenizer_vocab(tokenizer: dict, size: int) -> tuple[list[str], list[int], list[str]]:
    """(tokens, llama.cpp token types, merges) of the first `size` ids of a tokenizer.json BPE."""
    tokens: dict[int, str] = {i: t for t, i in tokenizer["model"]["vocab"].items()}
    types = dict.fromkeys(tokens, TOKEN_NORMAL)
    for added in tokenizer.get("added_tokens", []):
        tokens[added["id"]] = added["content"]
        types[added["id"]] = TOKEN_CONTROL if added.get("special") else TOKEN_USER_DEFINED
    merges = [m if isinstance(m, str) else " ".join(m) for m in tokenizer["model"].get("merges", [])]
    ids = range(size)
    return (
        [tokens.get(i, f"[PAD{i}]") for i in ids],
        [types.get(i, TOKEN_UNUSED) for i in ids],
        merges,
    )


def write_text_gguf(
    state: dict[str, np.ndarray], config: dict, tokenizer: dict, eos_ids: list[int], dest: Path, dtype: str
) -> None:
    """The text decoder as a `qwen3` GGUF in f32 or f16 (norms stay f32, as llama.cpp's converter keeps them)."""
    import gguf

    text = config["text_config"]
    vocab = int(text["vocab_size"])
    head_dim = int(text.get("head_dim") or text["hidden_size"] // text["num_attention_heads"])
    writer = gguf.GGUFWriter(str(dest), "qwen3")
    writer.add_context_length(int(text["max_position_embeddings"]))
    writer.add_embedding_length(int(text["hidden_size"]))
    writer.add_block_count(int(text["num_hidden_layers"]))
    writer.add_feed_forward_length(int(text["intermediate_size"]))
    writer.add_head_count(int(text["num_attention_heads"]))
    writer.add_head_count_kv(int(text["num_key_value_heads"]))
    writer.add_key_length(head_dim)
    writer.add_value_length(head_dim)
    writer.add_layer_norm_rms_eps(float(text["rms_norm_eps"]))
    writer.add_rope_freq_base(float(text["rope_parameters"]["rope_theta"]))
    writer.add_file_type(gguf.LlamaFileType.ALL_F32 if dtype == "f32" else gguf.LlamaFileType.MOSTLY_F16)
    tokens, types, merges = tokenizer_vocab(tokenizer, vocab)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("qwen2")  # Qwen2's split regex, which Molmo2's tokenizer uses
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    writer.add_token_merges(merges)
    writer.add_eos_token_id(eos_ids[0])
    writer.add_add_bos_token(False)  # the runtime tokenizes host-side; llama.cpp never adds tokens

    def add(name: str, weight: np.ndarray) -> None:
        keep_f32 = dtype == "f32" or weight.ndim == 1
        writer.add_tensor(name, np.ascontiguousarray(weight, np.float32 if keep_f32 else np.float16))

    prefix = "model.language_model."
    add("token_embd.weight", state[prefix + "embed_tokens.weight"][:vocab])  # text rows only
    add("output_norm.weight", state[prefix + "norm.weight"])
    add("output.weight", state["lm_head.weight"])
    for layer in range(int(text["num_hidden_layers"])):
        for source, target in LAYER_TENSORS.items():
            add(f"blk.{layer}.{target}.weight", state[f"{prefix}layers.{layer}.{source}.weight"])
    expected = 3 + len(LAYER_TENSORS) * int(text["num_hidden_layers"])
    text_names = [name for name in state if name.startswith(prefix) or name == "lm_head.weight"]
    if len(text_names) != expected:  # a tensor we do not map (a bias, an extra norm) must not be dropped
        raise UserError(f"Molmo2 text decoder has {len(text_names)} tensors, the Qwen3 mapping {expected}")
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def write_bundle(
    model_dir: Path,
    out: Path,
    quant: str,
    config: dict,
) -> tuple[dict[str, dict[str, str]], dict[str, str], dict]:
    """Write the text GGUF and the vision + embed graphs; returns (variants, files with sha256, manifest
    fields: image, tokens, model)."""
    import torch

    from export.onnx import _checksums, _eos_ids, _export_graph, _load
    from export.onnx.molmo2 import Molmo2Onnx

    family = Molmo2Onnx(config, model_dir)  # refuses preprocessing the engine cannot do
    log("[2/3] loading the checkpoint")
    model = _load(model_dir, torch.float32)
    variants = {"base": {"text": f"base/model-{quant}.gguf"}}
    text_path = out / variants["base"]["text"]
    log(f"[2/3] text decoder -> {variants['base']['text']} (qwen3)")
    state = {k: v.detach().float().numpy() for k, v in model.state_dict().items() if "vision" not in k}
    tokenizer = json.loads((model_dir / "tokenizer.json").read_text(encoding="utf-8"))
    eos_ids = _eos_ids(model_dir, config)
    if quant in ("f32", "f16"):
        write_text_gguf(state, config, tokenizer, eos_ids, text_path, quant)
    else:  # like the Qwen3-VL path: llama.cpp's quantizer works from a 16-bit GGUF
        staged = text_path.with_suffix(".f16.gguf")
        write_text_gguf(state, config, tokenizer, eos_ids, staged, "f16")
        quantize(staged, text_path, quant)
        staged.unlink()
    for role in ROLES:
        log(f"[3/3] {role} graph -> base/{role}.onnx")
        variants["base"][role] = _export_graph(family.graph(model, role), out, f"base/{role}.onnx")
    (out / "tokenizer.json").write_bytes((model_dir / "tokenizer.json").read_bytes())
    fields = {
        "image": family.image_config(),
        "tokens": {**family.tokens(), "eos_token_ids": eos_ids},
        "model": family.sizes(),  # sizes, processor layout switches, preprocessing: as the ONNX bundle
    }
    return variants, _checksums(out, variants), fields


class Molmo2Gguf(GgufFamily):
    architectures = (ARCHITECTURE,)

    def export(self, job: GgufJob) -> Path:
        """The hybrid bundle: text GGUF for llama.cpp, vision and embed graphs in ONNX."""
        model_dir, out, quant, lora, config = job.model_dir, job.out, job.quant, job.lora, job.config
        reason = refusal(config)
        if reason is None and lora is not None:
            # a merged LoRA may change the vision tower and the embeddings too: a second set of ONNX graphs
            # and its parity tests are not written yet
            reason = (
                "--perception-lora is not supported for Molmo2 yet (export it to ONNX with the LoRA instead)"
            )
        if reason is not None:  # before any work: no output directory appears
            raise UserError(f"{model_dir}: {ARCHITECTURE} cannot be exported to GGUF: {reason}")
        out.mkdir(parents=True, exist_ok=True)
        (out / MANIFEST).unlink(
            missing_ok=True
        )  # the bundle is incomplete until the manifest is written last
        shutil.rmtree(out / "base", ignore_errors=True)
        (out / "base").mkdir()
        log("[1/3] checking the text decoder: plain Qwen3")
        variants, files, fields = write_bundle(model_dir, out, quant, config)
        tools = versions(("sparc-engine", "llama-cpp-python", "gguf", "torch", "transformers", "onnx"))
        manifest = Manifest(
            format="gguf",
            architecture=ARCHITECTURE,
            source=str(model_dir.resolve()),
            dtype=quant,
            image=fields["image"],
            tokens=fields["tokens"],
            variants=variants,
            files=files,
            tools={**tools, "text_writer": "gguf.GGUFWriter (qwen3)"},
            model=fields["model"],
        )
        write_manifest(out, manifest)
        log(f"done: {out} (text decoder for llama.cpp, vision and embed graphs for onnxruntime)")
        return out

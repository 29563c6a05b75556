"""`sparc-engine export gguf` for Molmo2: the hybrid bundle (Qwen3 text GGUF + ONNX vision and embed
graphs) it writes, and the checkpoints it refuses."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

pytest.importorskip("torch")


def test_the_hybrid_bundle_lists_its_gguf_and_onnx_files(tiny_molmo2_gguf: Path) -> None:
    from runtimes.bundle import read_manifest, verify

    manifest = read_manifest(tiny_molmo2_gguf)
    assert (manifest.format, manifest.architecture) == ("gguf", "Molmo2ForConditionalGeneration")
    roles = {"text": "base/model-f32.gguf", "vision": "base/vision.onnx", "embed": "base/embed.onnx"}
    assert manifest.variants == {"base": roles}
    assert set(manifest.files) == {"tokenizer.json", *roles.values()}
    assert {"image_token_id", "eos_token_ids"} <= set(manifest.tokens) and "processor" in manifest.model
    verify(tiny_molmo2_gguf, manifest)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"qk_norm_type": "olmo"}, "qk_norm_type='olmo'"),
        ({"norm_after": True}, "norm_after=True"),
        ({"attention_bias": True}, "attention_bias=True"),
        ({"rope_scaling_layers": [0]}, "rope_scaling_layers"),
    ],
)
def test_a_text_decoder_other_than_plain_qwen3_is_refused(tiny_molmo2, tmp_path, change, message):
    from engine.errors import UserError
    from export.gguf.base import GgufJob
    from export.gguf.molmo2 import Molmo2Gguf

    config = json.loads((tiny_molmo2 / "config.json").read_text())
    config["text_config"].update(change)
    with pytest.raises(UserError, match="cannot be exported to GGUF") as refused:
        Molmo2Gguf().export(GgufJob(tiny_molmo2, tmp_path / "out", "f32", None, config, None))
    assert message in str(refused.value) and not (tmp_path / "out").exists()


def test_a_perception_lora_is_refused_for_molmo2(tiny_molmo2, tmp_path):
    from engine.errors import UserError
    from export.gguf.base import GgufJob
    from export.gguf.molmo2 import Molmo2Gguf

    config = json.loads((tiny_molmo2 / "config.json").read_text())
    with pytest.raises(UserError, match="--perception-lora is not supported for Molmo2"):
        Molmo2Gguf().export(GgufJob(tiny_molmo2, tmp_path / "out", "f32", tmp_path / "lora", config, None))

"""`sparc-engine export gguf`: the bundle it writes, and what it refuses."""

import json

import pytest

from engine.cli import main
from engine.errors import UserError
from export.gguf import export_gguf
from export.gguf.qwen3vl import Qwen3VLGguf
from runtimes.bundle import read_manifest, verify
from runtimes.registry import UnregisteredArchitecture

QWEN3VL = Qwen3VLGguf()


def test_bundle_lists_every_file_with_its_sha256(tiny_qwen3vl_gguf, tiny_qwen3vl):
    manifest = read_manifest(tiny_qwen3vl_gguf)
    assert manifest.format == "gguf" and manifest.dtype == "f32"
    assert manifest.architecture == "Qwen3VLForConditionalGeneration"
    assert manifest.variants["base"] == {"text": "base/model-f32.gguf", "mmproj": "base/mmproj-f32.gguf"}
    # a text-only LoRA (q_proj, v_proj) gets its own text GGUF and shares the base mmproj
    assert manifest.variants["perception"] == {"text": "perception/model-f32.gguf"}
    assert manifest.file("perception", "mmproj") == "base/mmproj-f32.gguf"
    assert set(manifest.files) == {
        "tokenizer.json",
        *manifest.variants["base"].values(),
        "perception/model-f32.gguf",
    }
    verify(tiny_qwen3vl_gguf, manifest)
    config = json.loads((tiny_qwen3vl / "config.json").read_text())
    assert manifest.tokens["image_token_id"] == config["image_token_id"]
    assert manifest.tokens["eos_token_ids"]
    assert manifest.image.patch_size == 16 and manifest.image.merge_size == 2
    assert {"llama-cpp-python", "converter", "transformers"} <= set(manifest.tools)
    assert manifest.tools["pre_tokenizer_fallback"] == "qwen2"  # the tiny BPE is not in llama.cpp's table


def test_molmo2_whose_text_decoder_is_not_plain_qwen3_is_refused_before_any_work(tmp_path, capsys):
    model = tmp_path / "molmo2"
    model.mkdir()
    text = {"num_hidden_layers": 2, "qk_norm_type": "olmo", "hidden_act": "silu"}
    config = {"architectures": ["Molmo2ForConditionalGeneration"], "text_config": text}
    (model / "config.json").write_text(json.dumps(config))
    assert main(["export", "gguf", "--model", str(model), "--out", str(tmp_path / "out")]) == 1
    error = capsys.readouterr().err
    assert "Molmo2ForConditionalGeneration cannot be exported to GGUF" in error
    assert "qk_norm_type='olmo' (needs 'qwen3')" in error and "export it to ONNX instead" in error
    assert not (tmp_path / "out").exists()


def test_unknown_architecture_is_refused(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"architectures": ["LlavaForConditionalGeneration"]}))
    args = type(
        "Args", (), {"model": tmp_path, "out": tmp_path / "o", "quant": "f16", "perception_lora": None}
    )
    with pytest.raises(
        UnregisteredArchitecture, match="GGUF export: architecture 'LlavaForConditionalGeneration'"
    ):
        export_gguf(args)


def test_pre_tokenizer_fallback_only_for_the_qwen2_split_rule(tiny_qwen3vl, tmp_path):
    assert QWEN3VL.pre_tokenizer_fallback(tiny_qwen3vl) == "qwen2"
    tokenizer = json.loads((tiny_qwen3vl / "tokenizer.json").read_text())
    tokenizer["pre_tokenizer"] = {"type": "Split", "pattern": {"Regex": r"\s+"}, "behavior": "Isolated"}
    (tmp_path / "tokenizer.json").write_text(json.dumps(tokenizer))
    assert QWEN3VL.pre_tokenizer_fallback(tmp_path) is None  # a different rule must not pass for qwen2


def test_a_lora_on_the_vision_tower_needs_its_own_mmproj():
    assert QWEN3VL.touches_vision(["base_model.model.model.visual.blocks.0.attn.qkv.lora_A.weight"])
    assert not QWEN3VL.touches_vision(
        ["base_model.model.model.language_model.layers.0.self_attn.q_proj.lora_A.weight"]
    )


def test_converter_is_taken_from_a_sdist_without_the_rest_of_it(tmp_path):
    import tarfile

    from export.gguf.converter import _extract_converter

    tree = tmp_path / "llama_cpp_python-9.9.9"
    for relative in (
        "vendor/llama.cpp/convert_hf_to_gguf.py",
        "vendor/llama.cpp/conversion/qwen3vl.py",
        "vendor/llama.cpp/gguf-py/gguf/__init__.py",
        "vendor/llama.cpp/src/llama.cpp",  # not needed: left out
    ):
        (tree / relative).parent.mkdir(parents=True, exist_ok=True)
        (tree / relative).write_text("# stub\n")
    sdist = tmp_path / "llama_cpp_python-9.9.9.tar.gz"
    with tarfile.open(sdist, "w:gz") as archive:
        archive.add(tree, arcname=tree.name)
    _extract_converter(sdist, tmp_path / "out")
    extracted = {p.relative_to(tmp_path / "out").as_posix() for p in (tmp_path / "out").rglob("*.py")}
    assert extracted == {"convert_hf_to_gguf.py", "conversion/qwen3vl.py", "gguf-py/gguf/__init__.py"}


def test_without_llama_cpp_python_or_a_checkout_the_export_says_what_to_do(monkeypatch, tmp_path):
    from export.gguf import converter

    monkeypatch.setattr(converter, "llama_cpp_python_version", lambda: None)
    with pytest.raises(UserError, match=r"pip install 'sparc-engine\[llama\]'\) or pass --llama-cpp DIR"):
        converter.find_converter(None, print)
    with pytest.raises(UserError, match="no convert_hf_to_gguf.py there"):
        converter.find_converter(tmp_path, print)

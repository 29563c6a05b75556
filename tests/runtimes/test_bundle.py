import pytest

from runtimes.bundle import Manifest, read_manifest, sha256_file, verify, write_manifest
from runtimes.protocol import ImageConfig, RuntimeInputError


@pytest.fixture
def bundle(tmp_path):
    (tmp_path / "base").mkdir()
    (tmp_path / "perception").mkdir()
    (tmp_path / "base" / "decoder.onnx").write_bytes(b"base decoder")
    (tmp_path / "base" / "vision.onnx").write_bytes(b"vision")
    (tmp_path / "perception" / "decoder.onnx").write_bytes(b"lora decoder")
    files = {
        p: sha256_file(tmp_path / p)
        for p in ("base/decoder.onnx", "base/vision.onnx", "perception/decoder.onnx")
    }
    manifest = Manifest(
        format="onnx",
        architecture="Qwen3VLForConditionalGeneration",
        source="tiny",
        dtype="fp32",
        image=ImageConfig(patch_size=16),
        tokens={"image_token_id": 7, "eos_token_ids": [1, 2]},
        variants={
            "base": {"decoder": "base/decoder.onnx", "vision": "base/vision.onnx"},
            "perception": {"decoder": "perception/decoder.onnx"},
        },
        files=files,
        tools={"onnx": "1.23"},
    )
    write_manifest(tmp_path, manifest)
    return tmp_path, manifest


def test_manifest_round_trips(bundle):
    path, manifest = bundle
    assert read_manifest(path) == manifest
    verify(path, manifest)


def test_a_variant_lists_only_what_it_changes(bundle):
    _, manifest = bundle
    assert manifest.file("perception", "decoder") == "perception/decoder.onnx"
    assert manifest.file("perception", "vision") == "base/vision.onnx"
    with pytest.raises(RuntimeInputError, match="no variant 'thinking'"):
        manifest.file("thinking", "decoder")


def test_changed_or_missing_files_are_refused(bundle):
    path, manifest = bundle
    (path / "base" / "vision.onnx").write_bytes(b"tampered")
    with pytest.raises(RuntimeInputError, match="vision.onnx does not match its sha256"):
        verify(path, manifest)
    verify(path, manifest, ["base/decoder.onnx"])  # only what a variant uses is checked when asked
    (path / "base" / "decoder.onnx").unlink()
    with pytest.raises(RuntimeInputError, match="decoder.onnx is missing"):
        verify(path, manifest, ["base/decoder.onnx"])


def test_not_a_bundle_or_malformed(tmp_path):
    with pytest.raises(RuntimeInputError, match="not a bundle"):
        read_manifest(tmp_path)
    (tmp_path / "manifest.yaml").write_text("format: onnx\n")
    with pytest.raises(RuntimeInputError, match="malformed manifest"):
        read_manifest(tmp_path)

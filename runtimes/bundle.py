"""Bundles: a directory you copy to a device, described by its manifest.yaml.

    bundle/
      manifest.yaml     # format, architecture, source, dtype, variants, files with sha256, preprocessing
      tokenizer.json
      base/...          # the graphs or weights files
      perception/...    # only the files the perception LoRA changes; the rest come from base

Loading verifies every file a variant uses against its sha256 and refuses a bundle that does not match.
Only safetensors/ONNX/GGUF/engine files are read; nothing is unpickled.
"""

from __future__ import annotations

import hashlib
from dataclasses import asdict, dataclass, field
from pathlib import Path

import yaml

from runtimes.protocol import ImageConfig, RuntimeInputError

# The ONNX decoder's shared prefix KV inputs (batch 1), named PREFIX_KV.<layer>.key|value: the export
# writes them, the runtime finds them by this name.
PREFIX_KV = "prefix_key_values"
# The ONNX decoder's (1,) int64 input saying where in its own KV buffer the chunk's K/V are written; a
# decoder without it (exported before) returns present = past + chunk instead.
CACHE_POSITION = "cache_position"

MANIFEST = "manifest.yaml"
SCHEMA_VERSION = 1


@dataclass(frozen=True)
class Manifest:
    format: str  # onnx | gguf | tensorrt
    architecture: str  # HF `architectures[0]` of the source checkpoint: picks the engine's family
    source: str  # where it was exported from (checkpoint path or name)
    dtype: str  # fp32 | fp16 | bf16 | q8_0 | ...
    image: ImageConfig
    tokens: dict[str, int | list[int]]  # image_token_id, eos_token_ids, ...
    variants: dict[
        str, dict[str, str]
    ]  # variant -> role (e.g. "decoder") -> file path relative to the bundle
    files: dict[str, str]  # file path relative to the bundle -> sha256
    tools: dict[str, str] = field(default_factory=dict)  # versions of the tools used to export
    model: dict = field(default_factory=dict)  # format-specific sizes (layers, heads, ...)
    schema_version: int = SCHEMA_VERSION

    def file(self, variant: str, role: str) -> str:
        """The file playing `role` for `variant`; a variant lists only what differs from base."""
        if variant not in self.variants:
            raise RuntimeInputError(
                f"the bundle has no variant {variant!r} (it has: {', '.join(self.variants)})"
            )
        path = self.variants[variant].get(role) or self.variants["base"].get(role)
        if path is None:
            raise RuntimeInputError(f"the bundle has no {role!r} file for variant {variant!r}")
        return path


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def write_manifest(bundle: Path, manifest: Manifest) -> Path:
    """Write manifest.yaml last (temporary name, then rename): a bundle with a manifest is complete."""
    data = asdict(manifest)
    data["image"] = {key: list(v) if isinstance(v, tuple) else v for key, v in data["image"].items()}
    pending = bundle / (MANIFEST + ".tmp")
    pending.write_text(yaml.safe_dump(data, sort_keys=False))
    pending.replace(bundle / MANIFEST)
    return bundle / MANIFEST


def read_manifest(bundle: str | Path) -> Manifest:
    bundle = Path(bundle)
    path = bundle / MANIFEST
    if not path.is_file():
        raise RuntimeInputError(
            f"{bundle}: not a bundle (no {MANIFEST}); export one with `sparc-engine export`"
        )
    try:
        data = yaml.safe_load(path.read_text())
        raw_image = data.pop("image")
        image = ImageConfig(**{key: tuple(v) if isinstance(v, list) else v for key, v in raw_image.items()})
        manifest = Manifest(image=image, **data)
    except (yaml.YAMLError, TypeError, KeyError, AttributeError) as error:
        raise RuntimeInputError(f"{path}: malformed manifest ({error})") from None
    if manifest.schema_version > SCHEMA_VERSION:
        raise RuntimeInputError(f"{path}: written by a newer sparc-engine (schema {manifest.schema_version})")
    return manifest


def verify(bundle: str | Path, manifest: Manifest, paths: list[str] | None = None) -> None:
    """Check files (default: all) against their sha256; refuse a bundle with a missing or changed file."""
    bundle = Path(bundle)
    for relative in paths if paths is not None else list(manifest.files):
        expected = manifest.files.get(relative)
        if expected is None:
            raise RuntimeInputError(f"{bundle}: {relative} is used but not listed in {MANIFEST}")
        file = bundle / relative
        if not file.is_file():
            raise RuntimeInputError(f"{bundle}: {relative} is missing")
        if sha256_file(file) != expected:
            raise RuntimeInputError(
                f"{bundle}: {relative} does not match its sha256 in {MANIFEST} (corrupt or changed)"
            )

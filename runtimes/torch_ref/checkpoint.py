"""What the reference runtime and the exporters read from a checkpoint directory's JSON files.

A checkpoint states its preprocessing constants in preprocessor_config.json and, partly, in its model
config's vision section. Each family reads its own (`TorchFamily.read_image_config`); where both files
state a constant they must agree, and a checkpoint whose files contradict each other is refused with one
line naming both values, rather than fed pixels it was not trained on.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from runtimes.protocol import ImageConfig, RuntimeInputError
from runtimes.registry import architecture_of


def read_json(path: Path) -> dict:
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}


def agreed(model_dir: Path, processor: tuple[str, Any], model: tuple[str, Any], default: Any) -> Any:
    """One constant from (name, value) in preprocessor_config.json and in config.json (None: not stated)."""
    (processor_key, processor_value), (model_key, model_value) = processor, model
    if processor_value is not None and model_value is not None and processor_value != model_value:
        raise RuntimeInputError(
            f"{model_dir}: preprocessor_config.json {processor_key}={processor_value!r} contradicts "
            f"config.json {model_key}={model_value!r}"
        )
    return next((v for v in (processor_value, model_value) if v is not None), default)


def checkpoint_image_config(model_dir: Path) -> ImageConfig:
    """The preprocessing constants of any registered architecture's checkpoint."""
    from runtimes.torch_ref.family import TorchFamily  # the families import this module

    config = read_json(model_dir / "config.json")
    return TorchFamily.registry.lookup(architecture_of(config)).read_image_config(model_dir, config)

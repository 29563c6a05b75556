"""What an ONNX exporter must know of one model family, and the registry of families.

A family is one subclass filed under the Hugging Face `architectures` names it serves (the checkpoint's
`config.json`), like llama.cpp's converter classes: adding Molmo2 is adding `export/onnx/molmo2.py` with a
subclass and importing it in `export/onnx/__init__.py`. The format driver (`export/onnx/__init__.py`)
writes files and the manifest; a family only says which graphs exist and how to build each.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import ClassVar

import torch

# HF architecture name -> family class; filled by OnnxFamily.__init_subclass__, nowhere else.
ONNX_FAMILIES: dict[str, type[OnnxFamily]] = {}


@dataclass
class Graph:
    """One graph to export: a torch module traced with example inputs."""

    module: torch.nn.Module
    inputs: tuple[torch.Tensor, ...]  # example inputs, in the order of input_names
    input_names: list[str]
    output_names: list[str]
    dynamic_axes: dict[str, dict[int, str]] = field(default_factory=dict)


class OnnxFamily(ABC):
    architectures: ClassVar[tuple[str, ...]]  # HF `architectures` entries this family exports
    roles: ClassVar[tuple[str, ...]]  # graph roles, in export order; each becomes `<variant>/<role>.onnx`

    def __init_subclass__(cls, **kwargs: object) -> None:
        super().__init_subclass__(**kwargs)
        for required in ("architectures", "roles"):
            if not hasattr(cls, required):
                raise TypeError(f"ONNX family {cls.__name__} must define {required}")
        for architecture in cls.architectures:
            ONNX_FAMILIES[architecture] = cls

    def __init__(self, config: dict) -> None:
        self.config = config  # the checkpoint's config.json

    @abstractmethod
    def graph(self, model: torch.nn.Module, role: str) -> Graph:
        """The wrapper module and example inputs of one role, for a loaded (eval, float) model."""

    @abstractmethod
    def role_of(self, parameter: str) -> str:
        """The role whose graph holds a state-dict entry; raises on a name it does not know."""

    @abstractmethod
    def tokens(self) -> dict[str, int | list[int]]:
        """Token ids the runtime needs (image placeholder, eos, ...)."""

    @abstractmethod
    def sizes(self) -> dict:
        """Model sizes the runtime needs to build its inputs (layers, KV heads, head_dim, ...)."""

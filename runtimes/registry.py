"""One registration mechanism for everything that differs by model architecture.

Each concern that varies by model (the engine's prompts and parser, an exporter, a runtime's inputs) has
one base class that declares a `Registry`; a family is a subclass that names the Hugging Face
`architectures` it serves, and defining it files it, like llama.cpp's converter classes. Adding a family
to a concern is adding a module with one subclass and importing it in the concern's package.

It sits under runtimes/ because runtimes may import nothing of engine/ (DESIGN.md); engine/ and export/
import it from here.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from typing import ClassVar, Generic, TypeVar

from runtimes.protocol import RuntimeInputError

T = TypeVar("T")


class UnregisteredArchitecture(RuntimeInputError):
    """No class of a concern serves the checkpoint's architecture: one line naming it and what is registered."""


class Registry(Mapping[str, type[T]], Generic[T]):
    """HF architecture name -> the class that serves it, for one concern (e.g. "ONNX export")."""

    def __init__(self, concern: str) -> None:
        self.concern = concern
        self._classes: dict[str, type[T]] = {}

    def register(self, cls: type[T]) -> None:
        architectures = getattr(cls, "architectures", ())
        if not architectures:
            raise TypeError(f"{self.concern}: {cls.__name__} must define architectures")
        for architecture in architectures:
            if architecture in self._classes:
                raise TypeError(
                    f"{self.concern}: {architecture} is served by both "
                    f"{self._classes[architecture].__name__} and {cls.__name__}"
                )
            self._classes[architecture] = cls

    def lookup(self, architecture: str) -> type[T]:
        if architecture not in self._classes:
            raise UnregisteredArchitecture(
                f"{self.concern}: architecture {architecture!r} is not registered "
                f"(registered: {', '.join(sorted(self._classes)) or 'none'})"
            )
        return self._classes[architecture]

    def __getitem__(self, architecture: str) -> type[T]:
        return self._classes[architecture]

    def __iter__(self) -> Iterator[str]:
        return iter(self._classes)

    def __len__(self) -> int:
        return len(self._classes)


class Registered:
    """Base of a concern's classes: the base declares `registry`, every subclass files itself in it."""

    registry: ClassVar[Registry]
    architectures: ClassVar[tuple[str, ...]]  # HF `architectures` entries served

    def __init_subclass__(cls, **kwargs: object) -> None:
        super().__init_subclass__(**kwargs)
        if "registry" not in cls.__dict__:  # the concern's own base class declares the registry
            cls.registry.register(cls)


def architecture_of(config: Mapping) -> str:
    """The architecture a checkpoint's config.json names (its first `architectures` entry)."""
    return (config.get("architectures") or ["?"])[0]

"""Molmo2's image path in the llama.cpp runtime (runtimes/llamacpp/molmo2.py): one run of images per chunk."""

import pytest

pytest.importorskip("llama_cpp", reason="llama-cpp-python is not installed (pip install '.[llama]')")

from engine.families import family_for  # noqa: E402
from runtimes.llamacpp import LlamaCppRuntime  # noqa: E402
from runtimes.protocol import RuntimeInputError, Text  # noqa: E402
from tests.support import picture  # noqa: E402


def test_text_between_images_in_one_chunk_is_refused(tiny_molmo2_gguf):
    llama = LlamaCppRuntime(tiny_molmo2_gguf, device="cpu")
    try:
        family = family_for(llama.info.architecture, llama.info.image)
        first = family.prepare_image(picture(64, 64), 378, "a")
        second = family.prepare_image(picture(80, 40), 378, "b")
        segments = [*family.image_prefix(first), Text("and then"), *family.question_suffix("?", [second])]
        with pytest.raises(RuntimeInputError, match="text between its images"):
            llama.prefill(segments, "base")
    finally:
        llama.close()

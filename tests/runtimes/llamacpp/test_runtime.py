"""The llama.cpp runtime's own behaviour: exact pixels for libmtmd, pooled prefix sequences, bundle checks,
no torch on the run path. Its numbers against torch_ref are in tests/parity/."""

import shutil
import subprocess
import sys

import numpy as np
import pytest

llama_cpp = pytest.importorskip(
    "llama_cpp", reason="llama-cpp-python is not installed (pip install '.[llama]')"
)

from engine.families import family_for  # noqa: E402
from runtimes import open_runtime  # noqa: E402
from runtimes.llamacpp import LlamaCppRuntime, image_rgb  # noqa: E402
from runtimes.llamacpp.runtime import text_flash_attention  # noqa: E402
from runtimes.protocol import RuntimeInputError, Sampling, Text  # noqa: E402
from tests.support import picture, run_in_fresh_interpreter  # noqa: E402


@pytest.fixture(scope="module")
def llama(tiny_qwen3vl_gguf):
    runtime = LlamaCppRuntime(tiny_qwen3vl_gguf, device="cpu")
    yield runtime
    runtime.close()


def test_image_pixels_are_recovered_exactly(llama):
    family = family_for(llama.info.architecture, llama.info.image)
    image = picture(96, 160)
    prepared = family.prepare_image(image, None, "px")
    assert np.array_equal(image_rgb(prepared, family.image_config), np.asarray(image))  # 96x160: on the grid


def test_prefix_sequences_are_pooled_and_freed(tiny_qwen3vl_gguf):
    runtime = LlamaCppRuntime(tiny_qwen3vl_gguf, device="cpu", prefix_slots=2, max_rollouts=2)
    try:
        first, second = runtime.prefill([Text("a")], "base"), runtime.prefill([Text("b")], "base")
        with pytest.raises(RuntimeInputError, match="all 2 prefix sequences are held"):
            runtime.prefill([Text("c")], "base")
        with pytest.raises(RuntimeInputError, match="1..2"):
            runtime.generate(first, [Text(" d")], 3, Sampling(2))
        del first  # an evicted prefix frees its sequence
        third = runtime.prefill([Text("c")], "base")
        second.state.release()
        with pytest.raises(RuntimeInputError, match="released"):
            runtime.generate(second, [], 1, Sampling(2))
        assert runtime.generate(third, [Text(" d")], 2, Sampling(2))[0].generated_tokens == 2
    finally:
        runtime.close()


def test_tampered_bundle_is_refused(tiny_qwen3vl_gguf, tmp_path):
    bundle = shutil.copytree(tiny_qwen3vl_gguf, tmp_path / "bundle")
    weights = next((bundle / "base").glob("model-*.gguf"))
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0xFF
    weights.write_bytes(bytes(data))
    with pytest.raises(RuntimeInputError, match="does not match its sha256"):
        LlamaCppRuntime(bundle, device="cpu")


def test_unknown_variant_is_refused(llama):
    with pytest.raises(RuntimeInputError, match="variant 'lowres' is not available"):
        llama.prefill([Text("hi")], "lowres")


def test_opened_by_name_and_without_torch(tiny_qwen3vl_gguf):
    runtime = open_runtime("llamacpp", tiny_qwen3vl_gguf, "cpu")
    assert isinstance(runtime, LlamaCppRuntime) and runtime.info.variants == ("base", "perception")
    runtime.close()
    code = "import sys, runtimes.llamacpp; sys.exit(any(m in sys.modules for m in ('torch', 'transformers')))"
    assert subprocess.run([sys.executable, "-c", code]).returncode == 0  # the device run path


@pytest.mark.parametrize(("fixture", "resolution"), [("tiny_qwen3vl_gguf", 128), ("tiny_molmo2_gguf", 378)])
def test_a_bundle_runs_in_a_fresh_interpreter_without_torch(request, fixture, resolution) -> None:
    spec = {
        "model": {"bundle": str(request.getfixturevalue(fixture)), "runtime": "llamacpp", "device": "cpu"},
        "stages": [
            {"perceive": {"resolution": resolution, "rollouts": 2, "max_new_tokens": 8}},
            {"fuse": {}},
            {"crop": {"min_side": 32, "resolution": resolution}},
            {"reason": {"resolution": resolution, "max_new_tokens": 8}},
        ],
    }
    output = run_in_fresh_interpreter(spec)
    assert output["heavy"] == [] and isinstance(output["answer"], str)


def test_flash_attention_left_out_is_off_on_the_cpu_and_for_f32_and_auto_on_a_gpu():
    choose = text_flash_attention
    assert choose(None, exact=False, on_gpu=False) == llama_cpp.LLAMA_FLASH_ATTN_TYPE_DISABLED
    assert choose(None, exact=True, on_gpu=True) == llama_cpp.LLAMA_FLASH_ATTN_TYPE_DISABLED
    assert choose(None, exact=False, on_gpu=True) == llama_cpp.LLAMA_FLASH_ATTN_TYPE_AUTO
    assert choose(True, exact=True, on_gpu=False) == llama_cpp.LLAMA_FLASH_ATTN_TYPE_ENABLED
    assert choose(False, exact=False, on_gpu=True) == llama_cpp.LLAMA_FLASH_ATTN_TYPE_DISABLED
    with pytest.raises(RuntimeInputError, match="flash_attention: 'auto'; it takes true, false or nothing"):
        choose("auto", exact=False, on_gpu=False)

"""The reference runtime's own behaviour; its numbers against transformers are in tests/parity/test_reference.py."""

import pytest

from runtimes.protocol import RuntimeInputError, Text
from runtimes.torch_ref import TorchRefRuntime


def test_unknown_variant_is_refused(tiny_qwen3vl):
    with pytest.raises(RuntimeInputError, match="variant 'perception' is not available"):
        TorchRefRuntime(tiny_qwen3vl, device="cpu").prefill([Text("hi")], "perception")

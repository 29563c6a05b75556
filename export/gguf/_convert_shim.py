"""Run llama.cpp's convert_hf_to_gguf.py with one hook: a fallback for an unrecognized BPE pre-tokenizer.

    python _convert_shim.py LLAMA_CPP_DIR FALLBACK|- CONVERTER_ARGS...

The converter names a checkpoint's BPE pre-tokenizer by hashing how the tokenizer splits a test string
and looking the hash up in a table of known models; any other tokenizer (the tiny test model's own
byte-level BPE, a re-trained vocabulary) fails with "BPE pre-tokenizer was not recognized". When the
exporter has checked that the tokenizer splits text with the family's regex (Qwen2's for Qwen3-VL), it
passes that family's pre-tokenizer name as FALLBACK and the lookup returns it instead of failing.
Recognized tokenizers are untouched. Nothing is edited on disk: the hook wraps the method in memory.
"""

import sys


def main() -> None:
    llama_cpp_dir, fallback, *converter_args = sys.argv[1:]
    sys.path.insert(0, llama_cpp_dir)
    import convert_hf_to_gguf as converter

    try:  # llama.cpp since 2026 keeps the model classes in a `conversion` package
        from conversion.base import TextModel
    except ImportError:
        TextModel = converter.TextModel

    if fallback != "-":
        recognize = TextModel.get_vocab_base_pre

        def get_vocab_base_pre(self, tokenizer) -> str:
            try:
                return recognize(self, tokenizer)
            except NotImplementedError:
                print(
                    f"sparc-engine: pre-tokenizer not in llama.cpp's table, using {fallback!r}",
                    file=sys.stderr,
                )
                return fallback

        TextModel.get_vocab_base_pre = get_vocab_base_pre

    sys.argv = [converter.__file__, *converter_args]
    converter.main()


if __name__ == "__main__":
    main()

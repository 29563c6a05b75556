"""What every runtime computes alike for one model family, host-side and torch-free.

`qwen3vl.py`: the Qwen3-VL vision encoder's position tables (the exported vision graph takes them as inputs).
`molmo2.py`: how a Molmo2 image sits in the prompt (its token layout) and the prompt's model inputs.
A family whose runtimes share nothing of the kind has no module here.
"""

"""A small Qwen-style byte-level BPE tokenizer, trained offline from a built-in corpus.

Tests must never download from a hub, yet they need a tokenizer that behaves like Qwen's: the same
pre-tokenizer split regex, byte-level pieces, and the Qwen special tokens as single ids. This module trains
one in well under a second with the `tokenizers` library (no torch needed) and writes the files that both
`tokenizers.Tokenizer.from_file` and `transformers.Qwen2TokenizerFast.from_pretrained` read.

The vocabulary is tiny (about 1000 BPE tokens plus the specials), so ids do NOT match the real Qwen ones;
always look special ids up by name (see `SpecialIds`).
"""

from __future__ import annotations

import json
import random
from dataclasses import asdict, dataclass
from pathlib import Path

from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers

# The Qwen2 pre-tokenizer split pattern (contractions, letters with one leading non-letter, single digits,
# punctuation runs, newlines, whitespace). Qwen2/2.5/3-VL all use it; digits are split one by one, which is
# why coordinates like 512 cost three tokens.
QWEN2_SPLIT_REGEX = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)

# Qwen's special tokens, in Qwen's own id order (they follow the regular vocabulary there too).
QWEN_SPECIAL_TOKENS: tuple[str, ...] = (
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<|object_ref_start|>",
    "<|object_ref_end|>",
    "<|box_start|>",
    "<|box_end|>",
    "<|quad_start|>",
    "<|quad_end|>",
    "<|vision_start|>",
    "<|vision_end|>",
    "<|vision_pad|>",
    "<|image_pad|>",
    "<|video_pad|>",
)

BPE_VOCAB_SIZE = 1000  # regular (non-special) tokens, the 256 byte symbols included

# Written by us in the style of Qwen chat templates: `<|im_start|>role\n…<|im_end|>\n` turns, an image
# item becomes `<|vision_start|><|image_pad|><|vision_end|>` (the processor expands the single pad to one
# token per 32x32 px), and `add_generation_prompt` opens the assistant turn. No default system prompt,
# like Qwen3-VL.
CHAT_TEMPLATE = (
    "{%- for message in messages -%}"
    "{{- '<|im_start|>' + message['role'] + '\\n' -}}"
    "{%- if message['content'] is string -%}"
    "{{- message['content'] -}}"
    "{%- else -%}"
    "{%- for item in message['content'] -%}"
    "{%- if item['type'] == 'image' or 'image' in item -%}"
    "{{- '<|vision_start|><|image_pad|><|vision_end|>' -}}"
    "{%- elif item['type'] == 'video' or 'video' in item -%}"
    "{{- '<|vision_start|><|video_pad|><|vision_end|>' -}}"
    "{%- elif item['type'] == 'text' -%}"
    "{{- item['text'] -}}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- endif -%}"
    "{{- '<|im_end|>\\n' -}}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}"
    "{{- '<|im_start|>assistant\\n' -}}"
    "{%- endif -%}"
)


@dataclass(frozen=True)
class SpecialIds:
    """Ids of the special tokens the model config and the engine need, looked up in the trained vocab."""

    endoftext: int  # pad token, and a second stop token
    im_start: int
    im_end: int  # eos: ends an assistant turn
    vision_start: int
    vision_end: int
    image_pad: int  # one per merged 2x2 patch group (32x32 px)
    video_pad: int
    vocab_size: int  # regular + special tokens; the model's embedding may be larger (padded)

    def to_dict(self) -> dict[str, int]:
        return asdict(self)


# ---------------------------------------------------------------------------------------------- corpus

_OBJECTS = (
    "cat", "dog", "box", "car", "person", "bird", "cup", "chair", "table", "bottle", "phone", "book",
    "tree", "sign", "ball", "bag", "clock", "lamp", "shoe", "window", "door", "bicycle", "bus", "truck",
    "horse", "apple", "banana", "laptop", "keyboard", "mouse", "flower", "boat", "plate", "umbrella",
)  # fmt: skip
_COLORS = ("red", "blue", "green", "yellow", "black", "white", "brown", "orange", "gray", "pink")
_RELATIONS = ("next to", "on", "under", "behind", "in front of", "left of", "right of", "near", "above")
_QUESTIONS = (
    "What color is the {obj}?",
    "Is the {obj} on the left or on the right of the {obj2}?",
    "How many {obj}s are in the image?",
    "Where is the {color} {obj}?",
    "What is written on the {obj}?",
    "Is there a {obj} {rel} the {obj2}?",
    "Which object is closer to the camera, the {obj} or the {obj2}?",
)
_SENTENCES = (
    "The {color} {obj} is {rel} the {obj2}.",
    "A small {obj} sits {rel} a large {color} {obj2}.",
    "There are {n} {obj}s and one {obj2} in the picture.",
    "The answer is {n}.",
    "Look at the image carefully before you answer the question.",
    "Locate every {obj} in the image and output its bbox_2d and label in JSON format.",
    "Do not answer the question. Identify the objects it is about and return their boxes as JSON.",
    "Given the image and the question for context, list the relevant objects with bounding boxes.",
    "Output the point_2d of the {color} {obj} as JSON.",
    "The coordinates are relative, from 0 to 1000, with the origin at the top left corner.",
    "I can see a {color} {obj} {rel} the {obj2}, and nothing else.",
    "Yes, there is a {obj}. No, it is not {color}.",
    "Describe the image in one sentence.",
    "This is a photo of a {obj} and a {obj2} taken outside on a sunny day.",
)


# Common English words for filler sentences, so the BPE learns general word pieces too.
_WORD_TEXT = """
the of and to in is it you that he was for on are as with his they at be this have from or one had
by word but not what all were we when your can said there use an each which she do how their if will
up other about out many then them these so some her would make like him into time has look two more
write go see number no way could people my than first water been call who oil its now find long down
day did get come made may part over new sound take only little work know place year live me back
give most very after thing our just name good sentence man think say great where help through much
before line right too mean old any same tell boy follow came want show also around form three small
set put end does another well large must big even such because turn here why ask went men read need
land different home us move try kind hand picture again change off play spell air away animal house
point page letter mother answer found study still learn should world high every near add food
between own below country plant last school father keep never start city earth eye light thought
head under story saw left few while along might close something seem next hard open example begin
life always those both paper together got group often run important until children side feet mile
night walk white sea began grow took river four carry state once hear stop without second later miss
idea enough eat face watch far really almost let above girl sometimes mountain cut young talk soon
list song being leave family image question object
"""
_WORDS = _WORD_TEXT.split()


def _json_answer(rng: random.Random) -> str:
    """A grounding answer as Qwen3-VL writes it: a JSON list of boxes (0-1000 coordinates), often fenced."""
    items = []
    for _ in range(rng.randint(1, 3)):
        x1, y1 = rng.randint(0, 800), rng.randint(0, 800)
        x2, y2 = rng.randint(x1 + 10, 1000), rng.randint(y1 + 10, 1000)
        label = rng.choice(_OBJECTS)
        if rng.random() < 0.2:
            items.append({"point_2d": [rng.randint(0, 1000), rng.randint(0, 1000)], "label": label})
        else:
            items.append({"bbox_2d": [x1, y1, x2, y2], "label": label})
    body = json.dumps(items, indent=2 if rng.random() < 0.5 else None)
    return f"```json\n{body}\n```" if rng.random() < 0.6 else body


def tiny_corpus(num_lines: int = 1500) -> list[str]:
    """Deterministic English + JSON training text (fixed RNG: the vocab must not depend on any model seed)."""
    rng = random.Random(20251121)
    lines = []
    for i in range(num_lines):
        fields = {
            "obj": rng.choice(_OBJECTS),
            "obj2": rng.choice(_OBJECTS),
            "color": rng.choice(_COLORS),
            "rel": rng.choice(_RELATIONS),
            "n": rng.randint(0, 1000),
        }
        kind = i % 5
        if kind == 0:
            # Chat turns as the template lays them out, so role names become single tokens.
            question = rng.choice(_QUESTIONS).format(**fields)
            lines.append(f"system\nYou are a helpful assistant.\nuser\n{question}\nassistant\n")
        elif kind == 1:
            lines.append(rng.choice(_SENTENCES).format(**fields))
        elif kind == 2:
            lines.append(_json_answer(rng))
        elif kind == 3:
            words = [rng.choice(_WORDS) for _ in range(rng.randint(6, 16))]
            lines.append(" ".join(words).capitalize() + rng.choice((".", "?", "!", ",")))
        else:
            # Numbers, brackets and quotes on their own, so that digits and JSON punctuation merge well.
            lines.append(f'"{fields["obj"]}": [{fields["n"]}, {rng.randint(0, 1000)}], "count": {i}')
    return lines


# ------------------------------------------------------------------------------------------- tokenizer


def train_tiny_tokenizer(vocab_size: int = BPE_VOCAB_SIZE) -> Tokenizer:
    """Train the BPE and append the Qwen special tokens after the regular vocabulary (as Qwen does)."""
    # The same pipeline transformers' Qwen2 tokenizer builds, so the raw `tokenizers` object and the
    # transformers wrapper tokenize identically: NFC, regex split, then byte-level mapping.
    tokenizer = Tokenizer(models.BPE(unk_token=None, fuse_unk=False, byte_fallback=False))
    tokenizer.normalizer = normalizers.NFC()
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(QWEN2_SPLIT_REGEX), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=2,
        show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),  # every byte encodable: no unknown tokens
        special_tokens=[],
    )
    tokenizer.train_from_iterator(tiny_corpus(), trainer=trainer)
    # Special tokens match before the pre-tokenizer runs, so `<|image_pad|>` in plain text is one id.
    tokenizer.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in QWEN_SPECIAL_TOKENS])
    return tokenizer


def special_ids(tokenizer: Tokenizer) -> SpecialIds:
    def tid(token: str) -> int:
        value = tokenizer.token_to_id(token)
        if value is None:
            raise KeyError(f"{token} missing from the tokenizer")
        return value

    return SpecialIds(
        endoftext=tid("<|endoftext|>"),
        im_start=tid("<|im_start|>"),
        im_end=tid("<|im_end|>"),
        vision_start=tid("<|vision_start|>"),
        vision_end=tid("<|vision_end|>"),
        image_pad=tid("<|image_pad|>"),
        video_pad=tid("<|video_pad|>"),
        vocab_size=tokenizer.get_vocab_size(with_added_tokens=True),
    )


def _token_entry(content: str) -> dict:
    return {"content": content, "lstrip": False, "normalized": False, "rstrip": False, "single_word": False}


def _write_json(path: Path, data: dict) -> None:
    path.write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


def write_tiny_tokenizer(out_dir: str | Path) -> SpecialIds:
    """Write tokenizer.json, tokenizer_config.json, special_tokens_map.json and chat_template.jinja.

    The files are written by hand rather than through `save_pretrained` so their content is fixed by this
    module alone (stable bytes across transformers versions).
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tokenizer = train_tiny_tokenizer()
    ids = special_ids(tokenizer)
    tokenizer.save(str(out / "tokenizer.json"), pretty=True)

    # Every special token is listed in the config too, so transformers marks them special (skipped by
    # `decode(..., skip_special_tokens=True)`) exactly as the tokenizer.json does.
    added_tokens_decoder = {
        str(tokenizer.token_to_id(t)): {**_token_entry(t), "special": True} for t in QWEN_SPECIAL_TOKENS
    }
    additional = [t for t in QWEN_SPECIAL_TOKENS if t not in ("<|endoftext|>", "<|im_end|>")]
    _write_json(
        out / "tokenizer_config.json",
        {
            "tokenizer_class": "Qwen2TokenizerFast",
            "added_tokens_decoder": added_tokens_decoder,
            "additional_special_tokens": additional,
            "bos_token": None,  # Qwen prepends nothing
            "eos_token": "<|im_end|>",  # ends an assistant turn
            "pad_token": "<|endoftext|>",
            "unk_token": None,  # byte-level: every string is encodable
            "add_prefix_space": False,
            "clean_up_tokenization_spaces": False,
            "errors": "replace",
            "model_max_length": 4096,
            "split_special_tokens": False,
            "chat_template": CHAT_TEMPLATE,
        },
    )
    _write_json(
        out / "special_tokens_map.json",
        {
            "additional_special_tokens": additional,
            "eos_token": _token_entry("<|im_end|>"),
            "pad_token": _token_entry("<|endoftext|>"),
        },
    )
    # Processors read the template from here; the tokenizer reads it from tokenizer_config.json.
    (out / "chat_template.jinja").write_text(CHAT_TEMPLATE, encoding="utf-8")
    return ids

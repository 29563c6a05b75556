"""`sparc-engine data convert`: local copies of published benchmarks -> rows.jsonl (+ images) in --out.

Every row is multiple choice: {"id", "image" (relative to rows.jsonl), "question" (the question, the
options as "(A) ..." lines and the instruction to answer with a letter), "answer" (the letter),
"options" {"A": text, ...}, "category", ...}. Nothing is downloaded: fetch the benchmark yourself.
"""

from __future__ import annotations

import argparse
import base64
import binascii
import csv
import hashlib
import io
import json
import random
import re
import shutil
from collections.abc import Iterator, Sequence
from pathlib import Path

from PIL import Image, UnidentifiedImageError

from engine.errors import UserError

INSTRUCTION = "Answer with the option's letter from the given choices directly."
LETTERS = "ABCD"
_OPTION_LINE = re.compile(r"^\(([A-Z])\)\s*(.*)$")


def format_question(question: str, options: dict[str, str]) -> str:
    lines = [question.strip(), *(f"({letter}) {text}" for letter, text in options.items()), INSTRUCTION]
    return "\n".join(lines)


def _write_rows(out: Path, rows: Sequence[dict]) -> Path:
    path = out / "rows.jsonl"
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


# --- V*Bench -----------------------------------------------------------------------------------------

VSTAR_FOLDERS = ("direct_attributes", "relative_position")


def convert_vstar(src: Path, out: Path) -> list[dict]:
    """V*Bench (`craigwu/vstar_bench`): SRC holds `direct_attributes/` and `relative_position/`, each with
    `NAME.jpg` + `NAME.json` per question: {"target_object": [names], "bbox": [[x, y, w, h], ...] (pixels),
    "question", "options": [texts, the correct one FIRST]}.

    The options are shuffled into letters A, B, ... deterministically (seeded by the row id, `FOLDER/NAME`),
    so the answer is not always A. When SRC has the benchmark's `test_questions.jsonl` ({"image", "text",
    "category", "question_id", "label"}), its text (options included) and letters are used instead, and
    only the boxes come from the per-image json. Rows also carry `boxes` (xyxy), `labels` and `category`
    (the folder); images are copied to OUT/images/FOLDER/.
    """
    annotations = _vstar_annotations(src)
    official = _vstar_official(src / "test_questions.jsonl")
    missing = sorted(set(official) - set(annotations))
    if missing:
        raise UserError(f"{src}/test_questions.jsonl names {missing[0]}, which has no image + json in {src}")
    rows = []
    for row_id, (image, annotation) in annotations.items():
        if official and row_id not in official:
            continue  # the official list is the benchmark
        question = official.get(row_id) or _shuffled_question(annotation, row_id)
        target = out / "images" / image.relative_to(src)
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(image, target)
        rows.append(
            {
                "id": row_id,
                "image": target.relative_to(out).as_posix(),
                **question,
                "boxes": [[x, y, x + w, y + h] for x, y, w, h in annotation["bbox"]],
                "labels": list(annotation["target_object"]),
                "category": image.parent.name,
            }
        )
    return rows


def _vstar_annotations(src: Path) -> dict[str, tuple[Path, dict]]:
    """`FOLDER/NAME` -> (image path, its json), in folder then name order."""
    folders = [src / name for name in VSTAR_FOLDERS if (src / name).is_dir()]
    if not folders:
        raise UserError(f"{src}: not a V*Bench copy (no {' or '.join(VSTAR_FOLDERS)} folder)")
    annotations = {}
    for folder in folders:
        for meta in sorted(folder.glob("*.json")):
            images = sorted(p for p in meta.parent.glob(meta.stem + ".*") if p.suffix.lower() != ".json")
            if not images:
                raise UserError(f"{meta}: no image {meta.stem}.jpg next to it")
            annotation = _read_json(meta)
            missing = [k for k in ("target_object", "bbox", "question", "options") if k not in annotation]
            if missing:
                raise UserError(f"{meta}: lacks {', '.join(missing)}")
            annotations[f"{folder.name}/{meta.stem}"] = (images[0], annotation)
    return annotations


def _shuffled_question(annotation: dict, row_id: str) -> dict:
    """{"question", "answer", "options"}: the options (the correct one first in the json) under letters in
    an order fixed by the row id."""
    texts = [str(text) for text in annotation["options"]]
    if not 2 <= len(texts) <= len(LETTERS):
        raise UserError(f"{row_id}: {len(texts)} options (V*Bench has 2 to {len(LETTERS)})")
    order = list(range(len(texts)))
    random.Random(row_id).shuffle(order)  # a str seed is hashed with sha512: the same on every run
    options = {letter: texts[i] for letter, i in zip(LETTERS, order)}
    question = format_question(annotation["question"], options)
    return {"question": question, "answer": LETTERS[order.index(0)], "options": options}


def _vstar_official(path: Path) -> dict[str, dict]:
    """`FOLDER/NAME` -> {"question" (its text, options included), "answer", "options", "question_id"}."""
    if not path.is_file():
        return {}
    questions = {}
    for number, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        record = _parse_json(line, f"{path}:{number}")
        text = record.get("text")
        if not isinstance(text, str) or "image" not in record or "label" not in record:
            raise UserError(f"{path}:{number}: expected {{image, text, label, ...}}")
        options = dict(m.groups() for m in map(_OPTION_LINE.match, text.splitlines()) if m)
        if record["label"] not in options:
            raise UserError(f"{path}:{number}: label {record['label']!r} is not one of its options")
        row_id = Path(record["image"]).with_suffix("").as_posix()
        questions[row_id] = {
            "question": text,
            "answer": record["label"],
            "options": options,
            "question_id": record.get("question_id"),
        }
    return questions


# --- HR-Bench ----------------------------------------------------------------------------------------

HRBENCH_COLUMNS = ("index", "question", "answer", "category", "A", "B", "C", "D", "image")
# a TSV image field this short names the index of the row whose image it shares (VLMEvalKit's TSV layout)
_IMAGE_REFERENCE_MAX = 64


def convert_hrbench(src: Path, out: Path) -> list[dict]:
    """HR-Bench 4K/8K (`DreamMr/HR-Bench`): SRC is `hr_bench_4k.tsv` / `hr_bench_8k.tsv` (or a parquet
    file with the same columns): index, question, answer (the letter), category (single | cross), A, B,
    C, D, cycle_category, image (base64 JPEG; in a TSV, a short value is the index of the row whose image
    it reuses).

    Each distinct image is written once, as OUT/images/<sha256 prefix>.<format>; rows get options A-D, the
    question formatted as V*Bench's, `category` and `cycle_category` from the file.
    """
    rows, images = [], {}  # images: index -> file name of the image that row carries
    for record in _hrbench_records(src):
        missing = [c for c in HRBENCH_COLUMNS if c not in record]
        if missing:
            raise UserError(
                f"{src}: no column {', '.join(missing)} (HR-Bench has {', '.join(HRBENCH_COLUMNS)})"
            )
        index, image = str(record["index"]), str(record["image"])
        if len(image) > _IMAGE_REFERENCE_MAX:
            images[index] = _write_image(image, out / "images", f"{src} index {index}")
        options = {letter: str(record[letter]) for letter in LETTERS}
        answer = str(record["answer"]).strip()
        if answer not in options:
            raise UserError(f"{src}: index {index} has answer {answer!r}, not one of {', '.join(LETTERS)}")
        row = {
            "id": index,
            "image": index if index in images else image,  # the index whose image it shows; a file below
            "question": format_question(str(record["question"]), options),
            "answer": answer,
            "options": options,
            "category": record["category"],
        }
        if "cycle_category" in record:
            row["cycle_category"] = record["cycle_category"]
        rows.append(row)
    for row in rows:  # references may point forward: resolved once every image is written
        if row["image"] not in images:
            raise UserError(
                f"{src}: index {row['id']} shows the image of index {row['image']}, which has none"
            )
        row["image"] = f"images/{images[row['image']]}"
    return rows


def _hrbench_records(src: Path) -> Iterator[dict]:
    if not src.is_file():
        raise UserError(f"{src}: give the HR-Bench TSV or parquet file (e.g. hr_bench_4k.tsv)")
    if src.suffix == ".parquet":
        try:
            import pyarrow.parquet as parquet
        except ImportError:
            raise UserError(
                "reading parquet needs pyarrow: pip install pyarrow, or convert the TSV"
            ) from None
        for batch in parquet.ParquetFile(src).iter_batches(batch_size=64):  # never the whole file in memory
            yield from batch.to_pylist()
        return
    # the base64 image field is far larger than csv's default limit (128 KiB)
    previous = csv.field_size_limit(2**31 - 1)
    try:
        with src.open(newline="", encoding="utf-8") as handle:
            yield from csv.DictReader(handle, delimiter="\t")
    finally:
        csv.field_size_limit(previous)


def _write_image(encoded: str, folder: Path, where: str) -> str:
    """Decode a base64 image and write it once under its content hash; returns the file name."""
    try:
        data = base64.b64decode(encoded, validate=True)
        kind = Image.open(io.BytesIO(data)).format
    except (binascii.Error, UnidentifiedImageError):
        raise UserError(f"{where}: the image is not a base64-encoded image") from None
    name = f"{hashlib.sha256(data).hexdigest()[:16]}.{'jpg' if kind == 'JPEG' else kind.lower()}"
    folder.mkdir(parents=True, exist_ok=True)
    if not (folder / name).is_file():
        (folder / name).write_bytes(data)
    return name


# --- shared ------------------------------------------------------------------------------------------


def _parse_json(text: str, where: str) -> dict:
    try:
        record = json.loads(text)
    except json.JSONDecodeError as error:
        raise UserError(f"{where}: not valid JSON ({error.msg})") from None
    if not isinstance(record, dict):
        raise UserError(f"{where}: expected a JSON object")
    return record


def _read_json(path: Path) -> dict:
    return _parse_json(path.read_text(), str(path))


CONVERTERS = {"vstar": convert_vstar, "hrbench": convert_hrbench}


def convert_command(args: argparse.Namespace) -> str:
    if not args.src.exists():
        raise UserError(f"{args.src}: no such file or folder")
    args.out.mkdir(parents=True, exist_ok=True)
    rows = CONVERTERS[args.format](args.src, args.out)
    path = _write_rows(args.out, rows)
    images = len({row["image"] for row in rows})
    return f"{len(rows)} rows on {images} images written to {path}"

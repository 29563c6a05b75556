"""Benchmark loaders on small fixtures in the published layouts: V*Bench folders, HR-Bench TSV/parquet."""

import base64
import csv
import io
import json
import sys

import numpy as np
import pytest
from PIL import Image

from engine.batch import read_rows
from engine.cli import main
from engine.errors import UserError
from evals.loaders import INSTRUCTION, convert_hrbench, convert_vstar

VSTAR = {
    "direct_attributes/sa_1": {
        "target_object": ["glove"],
        "bbox": [[10, 20, 30, 40]],
        "question": "What is the material of the glove?",
        "options": ["rubber", "cotton", "leather", "polyester"],
    },
    "direct_attributes/sa_2": {
        "target_object": ["cup"],
        "bbox": [[5, 5, 10, 10]],
        "question": "What is the color of the cup?",
        "options": ["white", "black", "red", "green"],
    },
    "relative_position/sa_3": {
        "target_object": ["dog", "car"],
        "bbox": [[0, 0, 8, 8], [40, 40, 20, 10]],
        "question": "Is the dog on the left or right side of the car?",
        "options": ["left", "right"],
    },
}


def _image(width=64, height=48, seed=0):
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 255, (height, width, 3), dtype=np.uint8))


@pytest.fixture
def vstar(tmp_path):
    src = tmp_path / "vstar_bench"
    for i, (name, annotation) in enumerate(VSTAR.items()):
        (src / name).parent.mkdir(parents=True, exist_ok=True)
        _image(seed=i).save(src / f"{name}.jpg", format="JPEG")
        (src / f"{name}.json").write_text(json.dumps(annotation))
    return src


def test_vstar_rows_shuffle_the_options_deterministically(vstar, tmp_path):
    rows = convert_vstar(vstar, tmp_path / "a")
    assert [r["id"] for r in rows] == list(VSTAR)
    for row in rows:
        annotation = VSTAR[row["id"]]
        assert row["options"][row["answer"]] == annotation["options"][0]  # the json lists the right one first
        assert list(row["options"]) == list("ABCD"[: len(annotation["options"])])
        assert sorted(row["options"].values()) == sorted(annotation["options"])
        letters = "\n".join(f"({k}) {v}" for k, v in row["options"].items())
        assert row["question"] == f"{annotation['question']}\n{letters}\n{INSTRUCTION}"
        assert row["labels"] == annotation["target_object"]
        assert row["category"] == row["id"].split("/")[0]
        assert (tmp_path / "a" / row["image"]).is_file()
    assert rows[2]["boxes"] == [[0, 0, 8, 8], [40, 40, 60, 50]]  # x, y, w, h -> x1, y1, x2, y2
    assert {r["answer"] for r in rows} != {"A"}  # shuffled: the right option is not always first
    assert convert_vstar(vstar, tmp_path / "b") == rows  # the same every run


def test_vstar_prefers_the_official_questions_file(vstar, tmp_path):
    text = "What is the color of the cup?\n(A) red\n(B) white\n(C) black\n(D) green\n" + INSTRUCTION
    official = {"image": "direct_attributes/sa_2.jpg", "text": text, "category": "direct_attributes",
                "question_id": 7, "label": "B"}  # fmt: skip
    (vstar / "test_questions.jsonl").write_text(json.dumps(official) + "\n")
    (row,) = convert_vstar(vstar, tmp_path / "out")  # the official file lists the benchmark's questions
    assert (row["id"], row["question"], row["answer"]) == ("direct_attributes/sa_2", text, "B")
    assert row["options"] == {"A": "red", "B": "white", "C": "black", "D": "green"}
    assert row["question_id"] == 7
    assert row["boxes"] == [[5, 5, 15, 15]]  # boxes still from the per-image json


def test_vstar_not_a_copy(tmp_path):
    with pytest.raises(UserError, match="not a V.Bench copy"):
        convert_vstar(tmp_path, tmp_path / "out")


def _b64(image, format="PNG"):
    buffer = io.BytesIO()
    image.save(buffer, format=format)
    return base64.b64encode(buffer.getvalue()).decode()


def _hrbench_records():
    big = _b64(_image(200, 200, seed=1))  # noise: ~160 KB of base64, over csv's default field limit
    small = _b64(_image(32, 32, seed=2), format="JPEG")
    base = {"question": "What is written on the sign?", "category": "single", "A": "stop", "B": "go",
            "C": "exit", "D": "wait"}  # fmt: skip
    return [
        {"index": 0, **base, "answer": "A", "cycle_category": "c0", "image": big},
        {"index": 1, **base, "answer": "B", "A": "go", "B": "stop", "cycle_category": "c1", "image": big},
        {"index": 2, **base, "answer": "D", "category": "cross", "cycle_category": "c2", "image": small},
        {"index": 3, **base, "answer": "C", "cycle_category": "c3", "image": "0"},  # shares the image of 0
    ]


def _write_tsv(path, records):
    with path.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(records[0]), delimiter="\t")
        writer.writeheader()
        writer.writerows(records)


def test_hrbench_tsv_writes_each_image_once(tmp_path):
    src = tmp_path / "hr_bench_4k.tsv"
    records = _hrbench_records()
    assert len(records[0]["image"]) > csv.field_size_limit()  # the limit must be raised to read it
    _write_tsv(src, records)
    limit = csv.field_size_limit()
    out = tmp_path / "out"
    rows = convert_hrbench(src, out)
    assert csv.field_size_limit() == limit  # raised only while reading
    assert [r["id"] for r in rows] == ["0", "1", "2", "3"]
    assert [r["answer"] for r in rows] == ["A", "B", "D", "C"]
    assert [r["category"] for r in rows] == ["single", "single", "cross", "single"]
    assert [r["cycle_category"] for r in rows] == ["c0", "c1", "c2", "c3"]
    assert rows[1]["options"] == {"A": "go", "B": "stop", "C": "exit", "D": "wait"}
    assert rows[0]["question"] == (
        f"What is written on the sign?\n(A) stop\n(B) go\n(C) exit\n(D) wait\n{INSTRUCTION}"
    )
    assert rows[0]["image"] == rows[1]["image"] == rows[3]["image"] != rows[2]["image"]
    assert sorted(p.name for p in (out / "images").iterdir()) == sorted(
        {rows[0]["image"][7:], rows[2]["image"][7:]}
    )
    assert rows[2]["image"].endswith(".jpg") and rows[0]["image"].endswith(".png")
    assert Image.open(out / rows[0]["image"]).size == (200, 200)


def test_hrbench_parquet(tmp_path):
    pyarrow = pytest.importorskip("pyarrow")
    parquet = pytest.importorskip("pyarrow.parquet")

    src = tmp_path / "hr_bench_8k.parquet"
    parquet.write_table(pyarrow.Table.from_pylist(_hrbench_records()), src)
    rows = convert_hrbench(src, tmp_path / "out")
    assert [r["answer"] for r in rows] == ["A", "B", "D", "C"]


def test_hrbench_parquet_without_pyarrow_is_one_line(tmp_path, monkeypatch):
    src = tmp_path / "hr_bench_8k.parquet"
    src.write_bytes(b"PAR1")
    monkeypatch.setitem(sys.modules, "pyarrow", None)  # an import of it now fails
    with pytest.raises(UserError, match="needs pyarrow: pip install pyarrow, or convert the TSV"):
        convert_hrbench(src, tmp_path / "out")


def test_hrbench_bad_image_and_missing_column(tmp_path):
    records = _hrbench_records()[:1]
    _write_tsv(tmp_path / "bad.tsv", [{**records[0], "image": "x" * 100}])
    with pytest.raises(UserError, match="index 0: the image is not a base64-encoded image"):
        convert_hrbench(tmp_path / "bad.tsv", tmp_path / "out")
    _write_tsv(tmp_path / "short.tsv", [{k: v for k, v in records[0].items() if k != "D"}])
    with pytest.raises(UserError, match="no column D"):
        convert_hrbench(tmp_path / "short.tsv", tmp_path / "out")


def test_convert_command_writes_rows_the_batch_runner_reads(vstar, tmp_path, capsys):
    out = tmp_path / "rows"
    assert main(["data", "convert", "vstar", "--src", str(vstar), "--out", str(out)]) == 0
    assert "3 rows on 3 images written to" in capsys.readouterr().out
    rows = read_rows(out / "rows.jsonl")
    assert [r.id for r in rows] == list(VSTAR) and all(r.image.is_file() for r in rows)
    assert main(["data", "convert", "hrbench", "--src", str(tmp_path / "nope.tsv"), "--out", str(out)]) == 1
    assert "no such file or folder" in capsys.readouterr().err

"""Dataset files as users upload them (CSV, JSONL, ZIPs of image folders), real images and hostile ones: what is
kept, what the report says, which files are refused and how, and the held-out split."""

from __future__ import annotations

import csv
import io
import json
import random
import re
import struct
import warnings
import zipfile
import zlib
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from aimass.datasets.parsing import (
    DatasetError,
    DatasetLimits,
    Example,
    ParsedDataset,
    ZipImages,
    detect_format,
    open_image,
    parse_dataset,
    preview,
)
from aimass.datasets.samples import TICKET_LABELS, digits_zip, tickets_csv
from aimass.datasets.split import stratified_split
from aimass.runtime.errors import InvalidArgument
from aimass.v1 import datasets_pb2

TEXT = datasets_pb2.TRAINING_TASK_TEXT_CLASSIFICATION
IMAGE = datasets_pb2.TRAINING_TASK_IMAGE_CLASSIFICATION
CSV = datasets_pb2.DATASET_FORMAT_CSV
JSONL = datasets_pb2.DATASET_FORMAT_JSONL
ZIP = datasets_pb2.DATASET_FORMAT_IMAGE_FOLDERS_ZIP


# -- helpers ---------------------------------------------------------------------------------------------------------


def write_csv(path: Path, rows: list[list[str]], header: tuple[str, ...] = ("text", "label")) -> Path:
    with path.open("w", newline="", encoding="utf-8") as file:
        writer = csv.writer(file)
        writer.writerow(header)
        writer.writerows(rows)
    return path


def three_each(*labels: str) -> list[list[str]]:
    """Three distinct good rows per label (enough to survive the default min_examples_per_class)."""
    return [[f"a good {label} example number {n}", label] for label in labels for n in range(3)]


def png(width: int = 32, height: int = 32, color: tuple[int, int, int] = (200, 30, 30)) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (width, height), color).save(buffer, format="PNG")
    return buffer.getvalue()


def noise(width: int, height: int, fmt: str) -> bytes:
    buffer = io.BytesIO()
    pixels = np.random.default_rng(width * height).integers(0, 256, (height, width, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(buffer, format=fmt)
    return buffer.getvalue()


def png_declaring(width: int, height: int) -> bytes:
    """A real 1x1 PNG whose IHDR chunk (CRC fixed up) claims ``width`` x ``height``."""
    data = bytearray(png(1, 1))
    ihdr = bytearray(data[16:29])
    ihdr[0:8] = struct.pack(">II", width, height)
    data[16:29] = ihdr
    data[29:33] = struct.pack(">I", zlib.crc32(b"IHDR" + bytes(ihdr)))
    return bytes(data)


def write_zip(path: Path, entries: dict[str, bytes], compression: int = zipfile.ZIP_DEFLATED) -> Path:
    with zipfile.ZipFile(path, "w", compression=compression) as archive:
        for name, data in entries.items():
            archive.writestr(name, data)
    return path


def good_images(*labels: str, prefix: str = "") -> dict[str, bytes]:
    return {
        f"{prefix}{label}/{n}.png": png(color=(40 * i % 256, 17 * n, 90))
        for i, label in enumerate(labels)
        for n in range(3)
    }


def patch_central_sizes(path: Path, member: str, compressed: int | None, uncompressed: int | None) -> None:
    """Makes the ZIP's central directory claim other sizes for ``member`` (what a hostile ZIP does)."""
    data = bytearray(path.read_bytes())
    name = member.encode()
    at = 0
    while (at := data.find(b"PK\x01\x02", at)) >= 0:
        name_len = struct.unpack("<H", data[at + 28 : at + 30])[0]
        if data[at + 46 : at + 46 + name_len] == name:
            if compressed is not None:
                data[at + 20 : at + 24] = struct.pack("<I", compressed)
            if uncompressed is not None:
                data[at + 24 : at + 28] = struct.pack("<I", uncompressed)
        at += 4
    path.write_bytes(bytes(data))


def kinds(parsed: ParsedDataset) -> list[tuple[int, str]]:
    return [(issue.line, issue.kind) for issue in parsed.report.issues]


def assert_consistent(parsed: ParsedDataset) -> None:
    """What every report must satisfy, whatever the file."""
    report = parsed.report
    assert report.rows_kept == len(parsed.examples)
    assert report.rows_read == report.rows_kept + report.rows_dropped
    assert sum(report.issue_counts.values()) == report.rows_dropped
    assert len(report.issues) <= 100
    assert sum(c.count for c in report.classes) == report.rows_kept
    assert [c.count for c in report.classes] == sorted((c.count for c in report.classes), reverse=True)
    assert parsed.labels == sorted({c.label for c in report.classes})
    assert [e.line for e in parsed.examples] == sorted(e.line for e in parsed.examples)


@pytest.fixture(scope="module")
def digits(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return digits_zip(tmp_path_factory.mktemp("digits") / "digits.zip", per_class=12)


# -- format detection ------------------------------------------------------------------------------------------------


def test_detect_format() -> None:
    assert detect_format(b"text,label\nhi,a\n", TEXT) == CSV
    assert detect_format(b'\xef\xbb\xbf  \n {"text": "hi"}\n', TEXT) == JSONL
    assert detect_format(b"PK\x03\x04rest", TEXT) == ZIP
    assert detect_format(b"anything at all", IMAGE) == ZIP
    assert detect_format(b"", TEXT) == CSV


# -- CSV -------------------------------------------------------------------------------------------------------------


def test_tickets_csv_parses_clean(tmp_path: Path) -> None:
    parsed = parse_dataset(tickets_csv(tmp_path / "t.csv", rows=300, seed=0), task=TEXT)
    assert parsed.format == CSV and parsed.task == TEXT
    assert parsed.report.rows_read == 300 and parsed.report.rows_kept == 300 and not parsed.report.issues
    assert parsed.labels == sorted(TICKET_LABELS)
    assert parsed.examples[0].line == 2  # the header is line 1
    assert parsed.report.warnings == []
    assert_consistent(parsed)


def test_csv_every_row_issue(tmp_path: Path) -> None:
    rows = [
        ["my invoice is wrong", "billing"],  # 2
        ["   ", "billing"],  # 3 EMPTY_TEXT
        ["a text without a label", ""],  # 4 MISSING_LABEL
        ["x" * 10_001, "billing"],  # 5 TEXT_TOO_LONG
        ["my invoice is wrong", "billing"],  # 6 DUPLICATE
        ["my invoice is wrong", "login"],  # 7 DUPLICATE, labels differ
        ["some text", "l" * 201],  # 8 BAD_ROW: label too long
        ["only a text"],  # 9 MISSING_LABEL: the cell is absent
        ["rare one", "rare"],  # 10 (RARE_CLASS)
        ["rare two", "rare"],  # 11 (RARE_CLASS)
        *three_each("login", "shipping"),  # 12-17
        ["I was charged twice", "billing"],  # 18
        ["please refund me", "billing"],  # 19
    ]
    parsed = parse_dataset(write_csv(tmp_path / "messy.csv", rows), task=TEXT)
    report = parsed.report
    assert kinds(parsed) == [
        (0, "RARE_CLASS"),
        (3, "EMPTY_TEXT"),
        (4, "MISSING_LABEL"),
        (5, "TEXT_TOO_LONG"),
        (6, "DUPLICATE"),
        (7, "DUPLICATE"),
        (8, "BAD_ROW"),
        (9, "MISSING_LABEL"),
    ]
    assert dict(report.issue_counts) == {
        "EMPTY_TEXT": 1,
        "MISSING_LABEL": 2,
        "TEXT_TOO_LONG": 1,
        "DUPLICATE": 2,
        "BAD_ROW": 1,
        "RARE_CLASS": 2,
    }
    details = {issue.line: issue.detail for issue in report.issues}
    assert "line 2" in details[6] and "differ" not in details[6]
    assert "labels differ" in details[7] and "'login'" in details[7] and "'billing'" in details[7]
    assert "10,001" in details[5] and "10,000" in details[5]
    assert "'rare' has 2 examples" in details[0] and "at least 3" in details[0]
    assert report.rows_read == 18 and report.rows_kept == 9 and report.rows_dropped == 9
    assert [(c.label, c.count) for c in report.classes] == [("billing", 3), ("login", 3), ("shipping", 3)]
    assert parsed.examples[0] == Example("my invoice is wrong", "billing", 2)
    assert any("fewer than 10 examples" in w for w in report.warnings)
    assert_consistent(parsed)


def test_csv_bom_custom_columns_quoted_lines_and_blank_lines(tmp_path: Path) -> None:
    path = tmp_path / "bom.csv"
    body = 'id,body,team\r\n1,"a ticket\r\nover two lines",billing\r\n\r\n'
    body += "".join(f"{n},text number {n},{'billing' if n % 2 else 'login'}\r\n" for n in range(2, 8))
    path.write_bytes(b"\xef\xbb\xbf" + body.encode())
    parsed = parse_dataset(path, task=TEXT, text_column="body", label_column="team")
    assert parsed.examples[0] == Example("a ticket\r\nover two lines", "billing", 2)
    assert parsed.examples[1].line == 5  # the quoted text took lines 2-3, line 4 is blank
    assert parsed.report.rows_read == 7 and parsed.report.rows_kept == 7
    assert [(c.label, c.count) for c in parsed.report.classes] == [("billing", 4), ("login", 3)]


def test_csv_unreadable_lines_are_bad_rows(tmp_path: Path) -> None:
    path = tmp_path / "bytes.csv"
    good = "".join(f"text {n},{'a' if n % 2 else 'b'}\n" for n in range(8)).encode()
    # Line 10 is Latin-1, not UTF-8; from line 11 a quoted field runs on past what the csv module reads as one field.
    runaway = b'"' + b"".join(b"y" * 20_000 + b"\n" for _ in range(8)) + b'",b\n'
    path.write_bytes(b"text,label\n" + good + b"caf\xe9 latin-1,a\n" + runaway)
    parsed = parse_dataset(path, task=TEXT)
    assert kinds(parsed)[:2] == [(10, "BAD_ROW"), (11, "BAD_ROW")]
    assert "not UTF-8" in parsed.report.issues[0].detail and "field" in parsed.report.issues[1].detail
    assert parsed.report.rows_kept == 8 and {e.line for e in parsed.examples} == set(range(2, 10))
    assert_consistent(parsed)


def test_csv_without_label_column_names_its_columns(tmp_path: Path) -> None:
    path = write_csv(tmp_path / "nolabel.csv", [["hello", "x"]], header=("body", "category"))
    with pytest.raises(DatasetError) as caught:
        parse_dataset(path, task=TEXT)
    message = str(caught.value)
    assert "'text' or 'label'" in message and "'body', 'category'" in message
    assert isinstance(caught.value, InvalidArgument) and isinstance(caught.value, ValueError)
    with pytest.raises(DatasetError, match="no 'team' column; its header row has: 'body', 'category'"):
        parse_dataset(path, task=TEXT, text_column="body", label_column="team")


def test_csv_columns_match_regardless_of_case(tmp_path: Path) -> None:
    path = write_csv(tmp_path / "case.csv", three_each("a", "b"), header=(" Text ", "LABEL"))
    assert parse_dataset(path, task=TEXT).report.rows_kept == 6
    # An exact name wins over one that differs in case.
    rows = [[text, "not this", label] for text, label in three_each("a", "b")]
    exact = write_csv(tmp_path / "exact.csv", rows, header=("text", "Label", "label "))
    assert parse_dataset(exact, task=TEXT).labels == ["a", "b"]
    clash = write_csv(tmp_path / "clash.csv", [["x", "y", "a"]], header=("text", "Label", "LABEL"))
    with pytest.raises(DatasetError, match="no 'label' column; its header row has: 'text', 'Label', 'LABEL'"):
        parse_dataset(clash, task=TEXT)


@pytest.mark.parametrize(
    ("rows", "expected"),
    [
        ([], "found: no usable rows (0 read)"),
        (
            [[f"t{n}", "only"] for n in range(20)],
            "at least two classes with 3+ examples each; found: 'only' (20)",
        ),
        (
            [*three_each("big"), ["x", "small"], ["y", "small"]],
            "found: 'big' (3), 'small' (2)",
        ),
        ([["", "a"], ["", "b"], ["t", ""]], "no usable rows (3 read; EMPTY_TEXT 2, MISSING_LABEL 1)"),
    ],
)
def test_too_few_classes_is_fatal(tmp_path: Path, rows: list[list[str]], expected: str) -> None:
    with pytest.raises(DatasetError, match=re.escape(expected)):
        parse_dataset(write_csv(tmp_path / "few.csv", rows), task=TEXT)


def test_empty_and_missing_files(tmp_path: Path) -> None:
    (tmp_path / "empty.csv").write_bytes(b"")
    with pytest.raises(DatasetError, match="empty"):
        parse_dataset(tmp_path / "empty.csv", task=TEXT)
    with pytest.raises(DatasetError, match="cannot be read"):
        parse_dataset(tmp_path / "absent.csv", task=TEXT)


def test_task_and_format_must_match(tmp_path: Path, digits: Path) -> None:
    text = tickets_csv(tmp_path / "t.csv", rows=30)
    with pytest.raises(DatasetError, match="image classification needs a ZIP of images in one folder per label"):
        parse_dataset(text, task=IMAGE, fmt=CSV)
    with pytest.raises(DatasetError, match="text classification needs CSV or JSONL; the file is ZIP"):
        parse_dataset(digits, task=TEXT)
    with pytest.raises(DatasetError, match="training task is 0"):
        parse_dataset(text, task=0)
    with pytest.raises(DatasetError, match="dataset format is 9"):
        parse_dataset(text, task=TEXT, fmt=9)
    # An image task reads the file as a ZIP whatever its first bytes: a CSV is then not a ZIP.
    with pytest.raises(DatasetError, match="not a readable ZIP archive"):
        parse_dataset(text, task=IMAGE)


# -- JSONL -----------------------------------------------------------------------------------------------------------


def test_jsonl_rows_and_bad_lines(tmp_path: Path) -> None:
    lines = [json.dumps({"text": f"sample {n}", "label": n % 2}) for n in range(6)]  # 1-6, numeric labels
    lines += [
        "{not json",  # 7
        "[1, 2]",  # 8
        json.dumps({"text": 5, "label": "a"}),  # 9
        json.dumps({"text": "label is a list", "label": ["a"]}),  # 10
        "",  # 11 blank: skipped
        json.dumps({"text": "no label here"}),  # 12
        json.dumps({"label": "0"}),  # 13
        json.dumps({"text": "sample 0", "label": "1"}),  # 14
        "[" * 100_000,  # 15: longer than a line may be
    ]
    path = tmp_path / "d.jsonl"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    parsed = parse_dataset(path, task=TEXT)
    assert parsed.format == JSONL
    assert kinds(parsed) == [
        (7, "BAD_ROW"),
        (8, "BAD_ROW"),
        (9, "BAD_ROW"),
        (10, "BAD_ROW"),
        (12, "MISSING_LABEL"),
        (13, "EMPTY_TEXT"),
        (14, "DUPLICATE"),
        (15, "TEXT_TOO_LONG"),
    ]
    assert parsed.labels == ["0", "1"] and parsed.report.rows_read == 14
    assert "not a JSON object" in parsed.report.issues[0].detail
    assert_consistent(parsed)


def test_jsonl_custom_fields(tmp_path: Path) -> None:
    path = tmp_path / "d.jsonl"
    path.write_text("".join(json.dumps({"q": f"t{n}", "y": "ab"[n % 2]}) + "\n" for n in range(6)))
    parsed = parse_dataset(path, task=TEXT, fmt=JSONL, text_column="q", label_column="y")
    assert [(e.text, e.label, e.line) for e in parsed.examples[:2]] == [("t0", "a", 1), ("t1", "b", 2)]


# -- limits ----------------------------------------------------------------------------------------------------------


def test_limits(tmp_path: Path) -> None:
    path = write_csv(tmp_path / "many.csv", [*three_each("a", "b", "c", "d"), ["a long text " * 10, "a"]])
    with pytest.raises(DatasetError, match="more than 10 rows"):
        parse_dataset(path, task=TEXT, limits=DatasetLimits(max_rows=10))
    with pytest.raises(DatasetError, match="4 classes; at most 3"):
        parse_dataset(path, task=TEXT, limits=DatasetLimits(max_classes=3))
    short = parse_dataset(path, task=TEXT, limits=DatasetLimits(max_text_chars=50))
    assert kinds(short) == [(14, "TEXT_TOO_LONG")] and "at most 50" in short.report.issues[0].detail


def test_label_limit_and_min_examples(tmp_path: Path) -> None:
    path = write_csv(tmp_path / "c.csv", [*three_each("a", "bb"), *([f"more {n}", "a"] for n in range(5))])
    with pytest.raises(DatasetError, match=re.escape("no usable rows (11 read; BAD_ROW 11)")):
        parse_dataset(path, task=TEXT, limits=DatasetLimits(max_label_chars=0))
    with pytest.raises(DatasetError, match=re.escape("found: 'a' (8)") + "$"):
        parse_dataset(path, task=TEXT, limits=DatasetLimits(max_label_chars=1))
    with pytest.raises(DatasetError, match=re.escape("two classes with 4+ examples each; found: 'a' (8), 'bb' (3)")):
        parse_dataset(path, task=TEXT, limits=DatasetLimits(min_examples_per_class=4))
    relaxed = parse_dataset(path, task=TEXT, limits=DatasetLimits(min_examples_per_class=1))
    assert [(c.label, c.count) for c in relaxed.report.classes] == [("a", 8), ("bb", 3)]


def test_imbalance_warning(tmp_path: Path) -> None:
    rows = [[f"big {n}", "big"] for n in range(40)] + three_each("small")
    parsed = parse_dataset(write_csv(tmp_path / "imb.csv", rows), task=TEXT)
    assert any("'big' has 40 examples, more than 10x class 'small' (3)" in w for w in parsed.report.warnings)


def test_first_hundred_issues_only_but_all_counted(tmp_path: Path) -> None:
    rows = three_each("a", "b") + [["", "a"]] * 250
    parsed = parse_dataset(write_csv(tmp_path / "bad.csv", rows), task=TEXT)
    assert len(parsed.report.issues) == 100 and parsed.report.issue_counts["EMPTY_TEXT"] == 250
    assert [i.line for i in parsed.report.issues] == list(range(8, 108))


# -- image ZIPs ------------------------------------------------------------------------------------------------------


def test_digits_zip(digits: Path) -> None:
    parsed = parse_dataset(digits, task=IMAGE)
    assert parsed.format == ZIP
    assert parsed.labels == [str(d) for d in range(10)]
    assert parsed.report.rows_read == 120 and parsed.report.rows_kept == 120 and not parsed.report.issues
    assert parsed.examples[0] == Example("0/0_000.png", "0", 1)
    image = open_image(digits, parsed.examples[0].text)
    assert image.mode == "RGB" and image.size == (32, 32)
    assert np.asarray(image).max() > 100  # the digit's strokes are there
    with ZipImages(digits) as images:
        sizes = {images.open(e.text).size for e in parsed.examples[:20]}
    assert sizes == {(32, 32)}
    assert_consistent(parsed)


def test_digits_zip_per_class_bounds(tmp_path: Path) -> None:
    with pytest.raises(InvalidArgument, match="per_class is 0"):
        digits_zip(tmp_path / "d.zip", per_class=0)
    with pytest.raises(InvalidArgument, match="scikit-learn's digits hold 1-"):
        digits_zip(tmp_path / "d.zip", per_class=10_000)


def test_zip_layout_rules(tmp_path: Path) -> None:
    entries = {
        **good_images("cats", "dogs", prefix="pets/"),  # one top-level folder: stripped
        "pets/": b"",
        "__MACOSX/pets/cats/._0.png": b"junk",
        "pets/.DS_Store": b"junk",
        "pets/cats/.hidden.png": b"junk",
        "pets/readme.txt": b"hello",  # at the top level once pets/ is stripped
        "pets/cats/more/deep.png": png(),  # nested too deep
    }
    parsed = parse_dataset(write_zip(tmp_path / "pets.zip", entries), task=IMAGE)
    assert parsed.labels == ["cats", "dogs"]
    assert parsed.report.rows_read == 8  # folders, __MACOSX/ and dotfiles are not rows
    issues = {i.path: (i.kind, i.detail) for i in parsed.report.issues}
    assert issues["pets/readme.txt"][0] == "BAD_ROW" and "not in a folder" in issues["pets/readme.txt"][1]
    assert issues["pets/cats/more/deep.png"][0] == "BAD_ROW" and "too deep" in issues["pets/cats/more/deep.png"][1]
    assert parsed.examples[0].text == "pets/cats/0.png" and parsed.examples[0].label == "cats"
    assert_consistent(parsed)
    # Two entries with one name: which is meant cannot be told, both are refused.
    doubled = tmp_path / "doubled.zip"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # zipfile's "Duplicate name"
        write_zip(doubled, good_images("cats", "dogs"))
        with zipfile.ZipFile(doubled, "a") as archive:
            archive.writestr("cats/0.png", png(3, 3))
    twice = parse_dataset(doubled, task=IMAGE, limits=DatasetLimits(min_examples_per_class=2))
    assert (
        kinds(twice) == [(1, "BAD_ROW"), (7, "BAD_ROW")]
        and "2 files named 'cats/0.png'" in twice.report.issues[0].detail
    )
    # Without the common folder, a file at the top is misplaced too; folders named like labels stay labels.
    flat = parse_dataset(write_zip(tmp_path / "flat.zip", {**good_images("cats", "dogs"), "x.png": png()}), task=IMAGE)
    assert flat.labels == ["cats", "dogs"] and kinds(flat) == [(7, "BAD_ROW")]


def test_zip_every_image_issue(tmp_path: Path) -> None:
    corrupt = bytearray(png(16, 16))
    corrupt[-20] ^= 0xFF  # inside the IDAT chunk: its CRC no longer matches
    gif = io.BytesIO()
    Image.new("RGB", (8, 8)).save(gif, format="GIF")
    entries = {
        **good_images("a", "b"),  # entries 1-6
        "a/tiny.png": png(1, 1),  # 7: a 1x1 PNG is an image
        "a/notes.png": b"these are not pixels",  # 8 NOT_AN_IMAGE
        "a/anim.gif": gif.getvalue(),  # 9 NOT_AN_IMAGE (not a served format)
        "a/empty.png": b"",  # 10 NOT_AN_IMAGE
        "a/corrupt.png": bytes(corrupt),  # 11 CORRUPT_IMAGE
        "a/truncated.png": png(64, 64)[:20],  # 12 CORRUPT_IMAGE: a PNG signature, then the header breaks off
        "a/huge.png": png_declaring(100_000, 100_000),  # 13 OVERSIZE_IMAGE (pixels, from the header)
        "a/half.png": noise(64, 64, "PNG")[:6000],  # 14 CORRUPT_IMAGE: pixel data breaks off
        "a/half.jpg": noise(64, 64, "JPEG")[:2000],  # 15 CORRUPT_IMAGE
        "a/photo.jpg": noise(64, 48, "JPEG"),  # 16 kept
        "b/copy.png": good_images("a")["a/0.png"],  # 17 DUPLICATE of a/0.png, labels differ
        "a/copy.png": good_images("a")["a/1.png"],  # 18 DUPLICATE
        "c/one.png": png(5, 5),  # 19, 20 RARE_CLASS
        "c/two.png": png(6, 6),
    }
    parsed = parse_dataset(write_zip(tmp_path / "bad.zip", entries), task=IMAGE)
    by_path = {i.path: (i.line, i.kind, i.detail) for i in parsed.report.issues}
    assert by_path["a/notes.png"][:2] == (8, "NOT_AN_IMAGE")
    assert by_path["a/anim.gif"][1] == "NOT_AN_IMAGE" and "GIF" in by_path["a/anim.gif"][2]
    assert by_path["a/empty.png"][1] == "NOT_AN_IMAGE"
    assert by_path["a/corrupt.png"][1] == "CORRUPT_IMAGE"
    assert by_path["a/truncated.png"][1] == "CORRUPT_IMAGE" and "cannot be read" in by_path["a/truncated.png"][2]
    assert by_path["a/half.png"][1] == "CORRUPT_IMAGE" and by_path["a/half.jpg"][1] == "CORRUPT_IMAGE"
    assert by_path["a/huge.png"][1] == "OVERSIZE_IMAGE"
    assert by_path["b/copy.png"][1] == "DUPLICATE" and "labels differ" in by_path["b/copy.png"][2]
    assert by_path["a/copy.png"][1] == "DUPLICATE" and "same image as line 2" in by_path["a/copy.png"][2]
    assert "'c' has 2 examples" in parsed.report.issues[0].detail
    assert dict(parsed.report.issue_counts) == {
        "NOT_AN_IMAGE": 3,
        "CORRUPT_IMAGE": 4,
        "OVERSIZE_IMAGE": 1,
        "DUPLICATE": 2,
        "RARE_CLASS": 2,
    }
    assert [(c.label, c.count) for c in parsed.report.classes] == [("a", 5), ("b", 3)]
    assert {"a/tiny.png", "a/photo.jpg"} <= {e.text for e in parsed.examples}
    assert_consistent(parsed)
    assert open_image(tmp_path / "bad.zip", "a/tiny.png").size == (1, 1)
    assert open_image(tmp_path / "bad.zip", "a/photo.jpg").size == (64, 48)
    for member, message in [("a/huge.png", "pixels"), ("a/corrupt.png", "cannot be read"), ("zz.png", "no file")]:
        with pytest.raises(DatasetError, match=message):
            open_image(tmp_path / "bad.zip", member)


def test_zip_image_limits(tmp_path: Path) -> None:
    entries = {**good_images("a", "b"), "a/big.png": png(100, 100, (1, 2, 3))}
    path = write_zip(tmp_path / "l.zip", entries)
    pixels = parse_dataset(path, task=IMAGE, limits=DatasetLimits(max_image_pixels=5_000))
    assert kinds(pixels) == [(7, "OVERSIZE_IMAGE")] and "100x100 = 10,000 pixels" in pixels.report.issues[0].detail
    size = len(entries["a/big.png"])
    too_big = parse_dataset(path, task=IMAGE, limits=DatasetLimits(max_image_bytes=size - 1))
    assert kinds(too_big) == [(7, "OVERSIZE_IMAGE")]
    with pytest.raises(DatasetError, match="7 entries; at most 6"):
        parse_dataset(path, task=IMAGE, limits=DatasetLimits(max_zip_entries=6))
    total = sum(len(d) for d in entries.values())
    with pytest.raises(DatasetError, match=f"declare {total:,} bytes uncompressed"):
        parse_dataset(path, task=IMAGE, limits=DatasetLimits(max_uncompressed_bytes=total - 1))


def test_zip_bombs_and_lying_headers(tmp_path: Path) -> None:
    # A real 4 MiB of zeros that deflates to a few KiB: refused from its declared ratio, never inflated.
    bomb = write_zip(tmp_path / "bomb.zip", {**good_images("a", "b"), "a/bomb.png": b"\x00" * (4 << 20)})
    parsed = parse_dataset(bomb, task=IMAGE)
    assert kinds(parsed) == [(7, "OVERSIZE_IMAGE")] and "ZIP bomb" in parsed.report.issues[0].detail
    # An entry whose directory claims 2 GiB: refused unread.
    liar = write_zip(tmp_path / "liar.zip", {**good_images("a", "b"), "a/liar.png": png()})
    patch_central_sizes(liar, "a/liar.png", compressed=None, uncompressed=0x7FFF_FFFF)
    parsed = parse_dataset(liar, task=IMAGE)
    assert kinds(parsed) == [(7, "OVERSIZE_IMAGE")]
    # Entries claiming 8 GiB in all: the whole file is refused.
    many = write_zip(tmp_path / "many.zip", {**good_images("a", "b"), "a/x.png": png(), "b/y.png": png(2, 2)})
    patch_central_sizes(many, "a/x.png", compressed=None, uncompressed=0xF000_0000)
    patch_central_sizes(many, "b/y.png", compressed=None, uncompressed=0xF000_0000)
    with pytest.raises(DatasetError, match="bytes uncompressed; at most 4,294,967,296"):
        parse_dataset(many, task=IMAGE)
    # An entry claiming fewer bytes than it holds: inflating stops at the claim and the CRC check fails.
    short = write_zip(tmp_path / "short.zip", {**good_images("a", "b"), "a/short.png": png(40, 40)})
    patch_central_sizes(short, "a/short.png", compressed=None, uncompressed=30)
    parsed = parse_dataset(short, task=IMAGE)
    assert kinds(parsed) == [(7, "CORRUPT_IMAGE")]


def test_corrupt_and_truncated_zips_are_fatal(tmp_path: Path, digits: Path) -> None:
    data = digits.read_bytes()
    (tmp_path / "truncated.zip").write_bytes(data[: len(data) // 2])
    with pytest.raises(DatasetError, match="not a readable ZIP archive"):
        parse_dataset(tmp_path / "truncated.zip", task=IMAGE)
    (tmp_path / "noise.zip").write_bytes(random.Random(1).randbytes(5000))
    with pytest.raises(DatasetError, match="send a ZIP of images with one folder per label"):
        parse_dataset(tmp_path / "noise.zip", task=IMAGE)


def test_fuzz_never_crashes(tmp_path: Path, digits: Path) -> None:
    """Random bytes and randomly damaged real files: a parsed dataset or DatasetError, nothing else."""
    rng = random.Random(14)
    original = digits.read_bytes()
    tickets = tickets_csv(tmp_path / "t.csv", rows=60).read_bytes()
    outcomes: Counter[str] = Counter()
    for n in range(60):
        if n % 3 == 0:
            data = rng.randbytes(rng.randint(1, 3000))
        else:
            damaged = bytearray(original if n % 3 == 1 else tickets)
            for _ in range(rng.randint(1, 30)):
                damaged[rng.randrange(len(damaged))] = rng.randrange(256)
            data = bytes(damaged)
        path = tmp_path / f"fuzz{n}"
        path.write_bytes(data)
        for task in (TEXT, IMAGE):
            try:
                parsed = parse_dataset(path, task=task)
            except DatasetError as e:
                assert str(e)
                outcomes["refused"] += 1
            else:
                assert_consistent(parsed)
                outcomes["parsed"] += 1
    assert outcomes["refused"] and outcomes["parsed"]  # both paths were exercised


def test_open_image_turns_photos_upright(tmp_path: Path) -> None:
    exif = Image.Exif()
    exif[0x0112] = 6  # taken with the camera turned: stored 40x20, shown 20x40
    buffer = io.BytesIO()
    Image.new("RGB", (40, 20), (0, 120, 255)).save(buffer, format="JPEG", exif=exif)
    path = write_zip(tmp_path / "phone.zip", {**good_images("a", "b"), "a/phone.jpg": buffer.getvalue()})
    assert parse_dataset(path, task=IMAGE).report.rows_kept == 7
    image = open_image(path, "a/phone.jpg")
    assert image.size == (20, 40) and image.mode == "RGB"


# -- preview ---------------------------------------------------------------------------------------------------------


def test_preview(tmp_path: Path) -> None:
    parsed = parse_dataset(write_csv(tmp_path / "p.csv", [["", "a"], *three_each("a", "b")]), task=TEXT)
    rows = preview(parsed, 2)
    assert [(r.text, r.label) for r in rows] == [("a good a example number 0", "a"), ("a good a example number 1", "a")]
    assert len(preview(parsed, 50)) == 6 and preview(parsed, 0) == []


# -- the split -------------------------------------------------------------------------------------------------------


def test_stratified_split_properties() -> None:
    labels = ["a"] * 100 + ["b"] * 30 + ["c"] * 2 + ["d"] * 1 + ["e"] * 7
    random.Random(0).shuffle(labels)
    train, held = stratified_split(labels, 0.2, seed=3)
    assert train == sorted(train) and held == sorted(held)
    assert sorted(train + held) == list(range(len(labels)))
    held_counts = Counter(labels[i] for i in held)
    train_counts = Counter(labels[i] for i in train)
    assert held_counts == {"a": 20, "b": 6, "c": 1, "e": 1}  # round(n * 0.2), at least one
    assert train_counts == {"a": 80, "b": 24, "c": 1, "d": 1, "e": 6}
    assert stratified_split(labels, 0.2, seed=3) == (train, held)
    assert stratified_split(labels, 0.2, seed=4) != (train, held)
    # Held out as far as possible, but never the whole class.
    few = ["x"] * 5 + ["y"] * 3
    rest, most = stratified_split(few, 0.95, seed=0)
    assert Counter(few[i] for i in most) == {"x": 4, "y": 2} and Counter(few[i] for i in rest) == {"x": 1, "y": 1}


@pytest.mark.parametrize("fraction", [0.0, 1.0, -0.1, 1.5])
def test_stratified_split_fraction_range(fraction: float) -> None:
    with pytest.raises(InvalidArgument, match="between 0 and 1"):
        stratified_split(["a", "b"], fraction, seed=0)


# -- sample data -----------------------------------------------------------------------------------------------------


def test_tickets_csv_is_learnable_but_not_trivial(tmp_path: Path) -> None:
    """A bag-of-words classifier trained on one draw and scored on another: well above chance (about 1/4), short of
    perfect (some tickets are too vague to tell)."""
    from sklearn.feature_extraction.text import TfidfVectorizer  # type: ignore[import-untyped]
    from sklearn.linear_model import LogisticRegression  # type: ignore[import-untyped]

    def rows(path: Path) -> tuple[list[str], list[str]]:
        with path.open(newline="", encoding="utf-8") as file:
            records = list(csv.DictReader(file))
        return [r["text"] for r in records], [r["label"] for r in records]

    train_texts, train_labels = rows(tickets_csv(tmp_path / "train.csv", rows=600, seed=1))
    test_texts, test_labels = rows(tickets_csv(tmp_path / "test.csv", rows=300, seed=2))
    assert len(set(train_texts)) == 600 and set(train_labels) == set(TICKET_LABELS)
    vectorizer = TfidfVectorizer().fit(train_texts)
    model = LogisticRegression(max_iter=1000).fit(vectorizer.transform(train_texts), train_labels)
    accuracy = model.score(vectorizer.transform(test_texts), test_labels)
    assert 0.8 < accuracy < 0.99
    assert (tmp_path / "train.csv").read_bytes() == tickets_csv(tmp_path / "again.csv", rows=600, seed=1).read_bytes()

"""A dataset file → the rows worth training on, and a per-row report of the rest (datasets.proto's ValidationReport).

Three formats: UTF-8 CSV with a header row, JSON Lines (one object per line) and a ZIP of images in one folder per
label. Hostile or broken input never crashes anything: a bad row is dropped and reported (``RowIssue`` kinds below),
and only a file that cannot be used at all raises ``DatasetError`` (not a ZIP, no label column, a limit exceeded,
fewer than two classes left). Every limit in ``DatasetLimits`` is checked before the work it guards: lines are read
with a length cap, a ZIP's entries are judged by their declared sizes before a byte is inflated (and inflating stops
at the cap whatever they claim), images by their header before any pixel is decoded. Nothing is extracted to disk.

Per row, the first problem found is reported (so ``sum(issue_counts.values()) == rows_dropped``): EMPTY_TEXT,
MISSING_LABEL, TEXT_TOO_LONG, BAD_ROW (unreadable line, label too long, misplaced ZIP entry), NOT_AN_IMAGE,
CORRUPT_IMAGE, OVERSIZE_IMAGE, DUPLICATE (the same text, or for images the same bytes, as an earlier kept row).
Then classes with fewer than ``min_examples_per_class`` kept rows lose their rows: one RARE_CLASS issue per class,
counted once per dropped row.
"""

from __future__ import annotations

import contextlib
import csv
import hashlib
import io
import json
import warnings
import zipfile
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Final

from PIL import Image, ImageOps, UnidentifiedImageError

from aimass.runtime.errors import InvalidArgument
from aimass.v1 import datasets_pb2
from services.vision.images import sniff_format  # the formats the vision service decodes, named as it names them

TEXT_TASK: Final = datasets_pb2.TRAINING_TASK_TEXT_CLASSIFICATION
IMAGE_TASK: Final = datasets_pb2.TRAINING_TASK_IMAGE_CLASSIFICATION
CSV: Final = datasets_pb2.DATASET_FORMAT_CSV
JSONL: Final = datasets_pb2.DATASET_FORMAT_JSONL
ZIP: Final = datasets_pb2.DATASET_FORMAT_IMAGE_FOLDERS_ZIP

EMPTY_TEXT: Final = "EMPTY_TEXT"
MISSING_LABEL: Final = "MISSING_LABEL"
TEXT_TOO_LONG: Final = "TEXT_TOO_LONG"
DUPLICATE: Final = "DUPLICATE"
CORRUPT_IMAGE: Final = "CORRUPT_IMAGE"
OVERSIZE_IMAGE: Final = "OVERSIZE_IMAGE"
NOT_AN_IMAGE: Final = "NOT_AN_IMAGE"
BAD_ROW: Final = "BAD_ROW"
RARE_CLASS: Final = "RARE_CLASS"

MAX_REPORTED_ISSUES: Final = 100
# A class this many times larger than the smallest one earns a warning.
IMBALANCE_WARNING_RATIO: Final = 10
# Image formats a dataset may hold: those VisionService.Classify accepts, so a trained model can be served.
IMAGE_FORMATS: Final = ("JPEG", "PNG", "WEBP")
IMAGE_FORMATS_TEXT: Final = "JPEG, PNG or WebP"
# A ZIP entry that declares more than this ratio of uncompressed to compressed bytes (and more than a MiB) is
# refused unread: real images hardly compress, a ZIP bomb's payload compresses a thousandfold.
MAX_COMPRESSION_RATIO: Final = 200
_RATIO_FLOOR_BYTES: Final = 1 << 20

FORMAT_NAMES: Final[dict[int, str]] = {CSV: "CSV", JSONL: "JSONL", ZIP: "ZIP of image folders"}
TASK_NAMES: Final[dict[int, str]] = {TEXT_TASK: "text classification", IMAGE_TASK: "image classification"}


@dataclass(frozen=True)
class Example:
    text: str  # the text, or for images the file's path inside the ZIP
    label: str
    line: int  # 1-based line in the file (CSV header is line 1), or the ZIP entry's index + 1


@dataclass(frozen=True)
class DatasetLimits:
    """What a dataset may be; the defaults run on a laptop. Each is checked before the work it guards."""

    max_text_chars: int = 10_000
    max_label_chars: int = 200
    max_rows: int = 1_000_000
    max_classes: int = 1_000
    min_examples_per_class: int = 3  # fewer: the class's rows are dropped (RARE_CLASS)
    max_image_bytes: int = 20 << 20  # one ZIP entry, compressed and uncompressed
    max_image_pixels: int = 40_000_000  # from the image header, before any decode (Pillow's decompression bomb)
    max_zip_entries: int = 200_000
    max_uncompressed_bytes: int = 4 << 30  # ZIP bomb guard: sum of entries' declared sizes, and ratio per entry

    @property
    def max_line_chars(self) -> int:
        """The longest line read whole: room for a text and a label at their limits, quoted or JSON-escaped."""
        return 2 * (self.max_text_chars + self.max_label_chars) + 4096


class DatasetError(InvalidArgument, ValueError):
    """The whole file is unusable; ``str(e)`` is a message for a person (what is wrong, what is allowed)."""

    default_reason = "INVALID_DATASET"


@dataclass
class ParsedDataset:
    task: int  # datasets_pb2.TrainingTask value
    format: int  # datasets_pb2.DatasetFormat value
    examples: list[Example]  # kept rows only, in file order
    report: datasets_pb2.ValidationReport

    @property
    def labels(self) -> list[str]:
        """The distinct labels of the kept rows, sorted."""
        return sorted({e.label for e in self.examples})


def detect_format(head: bytes, task: int) -> int:
    """The format of a file that starts with ``head``: an image task's files are ZIPs; otherwise a ZIP by its magic
    number, JSON Lines when the first non-blank character is ``{``, CSV for anything else."""
    if task == IMAGE_TASK or head.startswith(b"PK\x03\x04"):
        return ZIP
    stripped = head.removeprefix(b"\xef\xbb\xbf").lstrip()
    return JSONL if stripped.startswith(b"{") else CSV


# -- the report ------------------------------------------------------------------------------------------------------


class _Collector:
    """Kept rows and issues as a file is read, in file order."""

    def __init__(self, limits: DatasetLimits) -> None:
        self.limits = limits
        self.examples: list[Example] = []
        self.issues: list[datasets_pb2.RowIssue] = []
        self.counts: Counter[str] = Counter()
        self.rows_read = 0
        # For DUPLICATE: the key of each kept row (the text, or an image's SHA-256) → (label, line).
        self.seen: dict[str, tuple[str, int]] = {}

    def row(self) -> None:
        self.rows_read += 1
        if self.rows_read > self.limits.max_rows:
            raise DatasetError(
                f"the file holds more than {self.limits.max_rows:,} rows, the limit; split it or keep the most "
                "useful rows"
            )

    def issue(self, line: int, kind: str, detail: str, path: str = "") -> None:
        self.counts[kind] += 1
        if len(self.issues) < MAX_REPORTED_ISSUES:
            self.issues.append(datasets_pb2.RowIssue(line=line, path=path, kind=kind, detail=detail))

    def check_label(self, line: int, label: str, path: str = "") -> bool:
        if len(label) > self.limits.max_label_chars:
            self.issue(
                line, BAD_ROW, f"the label is {len(label):,} characters; at most {self.limits.max_label_chars}", path
            )
            return False
        return True

    def keep(self, line: int, text: str, label: str, key: str, path: str = "") -> None:
        """Keeps the row unless ``key`` was kept before (DUPLICATE, the first one stays)."""
        earlier = self.seen.get(key)
        if earlier is not None:
            first_label, first_line = earlier
            what = "the same image as" if path else "the same text as"
            if first_label == label:
                self.issue(line, DUPLICATE, f"{what} line {first_line}", path)
            else:
                self.issue(
                    line,
                    DUPLICATE,
                    f"{what} line {first_line}, but the labels differ ({label!r} here, {first_label!r} there); "
                    "the first is kept",
                    path,
                )
            return
        self.seen[key] = (label, line)
        self.examples.append(Example(text=text, label=label, line=line))

    def check_text_row(self, line: int, text: str | None, label: str | None) -> None:
        text = (text or "").strip()
        label = (label or "").strip()
        if not text:
            self.issue(line, EMPTY_TEXT, "the text is empty")
        elif not label:
            self.issue(line, MISSING_LABEL, "the label is missing or empty")
        elif len(text) > self.limits.max_text_chars:
            self.issue(
                line, TEXT_TOO_LONG, f"the text is {len(text):,} characters; at most {self.limits.max_text_chars:,}"
            )
        elif self.check_label(line, label):
            self.keep(line, text, label, text)

    def finish(self, task: int, fmt: int) -> ParsedDataset:
        """Drops the classes too small to learn, and writes the report; DatasetError when under two classes stay."""
        minimum = self.limits.min_examples_per_class
        found = Counter(e.label for e in self.examples)
        rare = {label: n for label, n in found.items() if n < minimum}
        rare_issues = [
            datasets_pb2.RowIssue(
                line=0,
                kind=RARE_CLASS,
                detail=f"class {label!r} has {n} example{'s' * (n != 1)}; at least {minimum} are needed to learn "
                "and evaluate it, so its rows were dropped",
            )
            for label, n in sorted(rare.items(), key=lambda item: (item[1], item[0]))
        ]
        if rare:
            self.examples = [e for e in self.examples if e.label not in rare]
            self.counts[RARE_CLASS] += sum(rare.values())
        kept = Counter(e.label for e in self.examples)
        if len(kept) < 2:
            raise DatasetError(self._too_few_classes(found))
        if len(kept) > self.limits.max_classes:
            raise DatasetError(
                f"the file holds {len(kept):,} classes; at most {self.limits.max_classes:,} are allowed: merge or "
                "drop some labels"
            )
        classes = sorted(kept.items(), key=lambda item: (-item[1], item[0]))
        report = datasets_pb2.ValidationReport(
            rows_read=self.rows_read,
            rows_kept=len(self.examples),
            rows_dropped=self.rows_read - len(self.examples),
            issue_counts=dict(self.counts),
            # Problems of a whole class (line 0) first, then the rows' in file order.
            issues=(rare_issues + self.issues)[:MAX_REPORTED_ISSUES],
            classes=[datasets_pb2.ClassCount(label=label, count=n) for label, n in classes],
            warnings=_warnings(classes),
        )
        return ParsedDataset(task=task, format=fmt, examples=self.examples, report=report)

    def _too_few_classes(self, found: Counter[str]) -> str:
        minimum = self.limits.min_examples_per_class
        if found:
            shown = ", ".join(f"{label!r} ({n})" for label, n in found.most_common(10))
            more = f" and {len(found) - 10} more" if len(found) > 10 else ""
            seen = f"{shown}{more}"
        else:
            problems = ", ".join(f"{kind} {n}" for kind, n in self.counts.most_common())
            seen = f"no usable rows ({self.rows_read} read{'; ' + problems if problems else ''})"
        return f"a dataset needs at least two classes with {minimum}+ examples each; found: {seen}"


def _warnings(classes: list[tuple[str, int]]) -> list[str]:
    result = []
    (largest, most), (smallest, least) = classes[0], classes[-1]
    if most > IMBALANCE_WARNING_RATIO * least:
        result.append(
            f"class {largest!r} has {most} examples, more than {IMBALANCE_WARNING_RATIO}x class {smallest!r} "
            f"({least}): the model will lean towards the large classes; add examples of the small ones"
        )
    few = [label for label, n in classes if n < 10]
    if few:
        shown = ", ".join(repr(label) for label in few[:10]) + (f" and {len(few) - 10} more" if len(few) > 10 else "")
        result.append(
            f"{len(few)} class{'es' * (len(few) != 1)} ha{'ve' if len(few) != 1 else 's'} fewer than 10 examples "
            f"({shown}): held-out metrics for them will be noisy"
        )
    return result


# -- text files ------------------------------------------------------------------------------------------------------


class _LineTooLong(Exception):
    pass


class _NotUtf8(Exception):
    pass


class _Lines:
    """A binary file's lines as text, each read with a length cap: a longer line is skipped whole and reported by
    raising ``_LineTooLong`` (the iterator goes on with the next line), a line that is not UTF-8 by ``_NotUtf8``."""

    def __init__(self, file: IO[bytes], max_chars: int) -> None:
        self.file = file
        self.max_bytes = 4 * max_chars  # UTF-8 needs at most four bytes a character
        self.max_chars = max_chars
        self.number = 0
        self.first = True

    def __iter__(self) -> _Lines:
        return self

    def __next__(self) -> str:
        raw = self.file.readline(self.max_bytes + 1)
        if not raw:
            raise StopIteration
        self.number += 1
        if self.first:
            raw = raw.removeprefix(b"\xef\xbb\xbf")
            self.first = False
        if len(raw) > self.max_bytes and not raw.endswith(b"\n"):
            while (rest := self.file.readline(1 << 20)) and not rest.endswith(b"\n"):
                pass
            raise _LineTooLong(f"the line is longer than {self.max_chars:,} characters")
        try:
            line = raw.decode("utf-8")
        except UnicodeDecodeError as e:
            raise _NotUtf8(f"the line is not UTF-8 text (byte {e.start + 1}: {raw[e.start : e.start + 1]!r})") from None
        if len(line) > self.max_chars:
            raise _LineTooLong(f"the line is {len(line):,} characters; at most {self.max_chars:,}")
        return line


def _column(names: list[str], wanted: str) -> int | None:
    """The column named ``wanted``: exactly, else the one column that differs only in case ("Text" for "text")."""
    if wanted in names:
        return names.index(wanted)
    folded = [i for i, name in enumerate(names) if name.casefold() == wanted.casefold()]
    return folded[0] if len(folded) == 1 else None


def _parse_csv(file: IO[bytes], text_column: str, label_column: str, out: _Collector) -> None:
    lines = _Lines(file, out.limits.max_line_chars)
    reader = csv.reader(lines, strict=False)
    try:
        header = next(reader)
    except StopIteration:
        raise DatasetError(
            "the CSV file is empty: it needs a header row naming its columns, then one row per example"
        ) from None
    except (_LineTooLong, _NotUtf8, csv.Error) as e:
        raise DatasetError(f"the CSV header row cannot be read: {e}; the file must be UTF-8 CSV") from None
    names = [name.strip() for name in header]
    text_at, label_at = _column(names, text_column), _column(names, label_column)
    missing = [c for c, at in ((text_column, text_at), (label_column, label_at)) if at is None]
    if text_at is None or label_at is None:
        has = ", ".join(repr(n) for n in names[:20]) + (" ..." if len(names) > 20 else "")
        raise DatasetError(
            f"the CSV has no {' or '.join(repr(c) for c in missing)} column; its header row has: {has}. Name the "
            "columns that hold the text and the label (text_column, label_column)"
        )
    while True:
        start = lines.number + 1  # a quoted field may run over several lines: the row starts at the first
        try:
            row = next(reader)
        except StopIteration:
            return
        except (_LineTooLong, _NotUtf8, csv.Error) as e:
            out.row()
            kind = TEXT_TOO_LONG if isinstance(e, _LineTooLong) else BAD_ROW
            out.issue(start, kind, str(e))
            continue
        if not row or all(not cell.strip() for cell in row):
            continue  # blank lines separate nothing; they are not rows
        out.row()
        text = row[text_at] if text_at < len(row) else None
        label = row[label_at] if label_at < len(row) else None
        out.check_text_row(start, text, label)


def _parse_jsonl(file: IO[bytes], text_field: str, label_field: str, out: _Collector) -> None:
    lines = _Lines(file, out.limits.max_line_chars)
    while True:
        try:
            line = next(lines)
        except StopIteration:
            return
        except _LineTooLong as e:
            out.row()
            out.issue(lines.number, TEXT_TOO_LONG, str(e))
            continue
        except _NotUtf8 as e:
            out.row()
            out.issue(lines.number, BAD_ROW, str(e))
            continue
        if not line.strip():
            continue
        out.row()
        number = lines.number
        try:
            record = json.loads(line)
        except (ValueError, RecursionError) as e:
            out.issue(number, BAD_ROW, f"the line is not a JSON object: {e}")
            continue
        if not isinstance(record, dict):
            out.issue(number, BAD_ROW, f"the line is JSON {type(record).__name__}, not an object with fields")
            continue
        text, label = record.get(text_field), record.get(label_field)
        if text is not None and not isinstance(text, str):
            out.issue(number, BAD_ROW, f"field {text_field!r} is {type(text).__name__}; it must be a string")
            continue
        if isinstance(label, (int, bool)) and not isinstance(label, bool):
            label = str(label)  # labels 0, 1, 2 ... are common
        if label is not None and not isinstance(label, str):
            out.issue(number, BAD_ROW, f"field {label_field!r} is {type(label).__name__}; it must be a string")
            continue
        out.check_text_row(number, text, label)


# -- image ZIPs ------------------------------------------------------------------------------------------------------


def _open_zip(path: Path, limits: DatasetLimits) -> zipfile.ZipFile:
    try:
        archive = zipfile.ZipFile(path)
    except Exception as e:  # BadZipFile, a truncated file's OSError/EOFError, a malformed directory's ValueError...
        raise DatasetError(
            f"the file is not a readable ZIP archive ({e or type(e).__name__}); send a ZIP of images with one "
            "folder per label"
        ) from None
    try:
        entries = archive.infolist()
        if len(entries) > limits.max_zip_entries:
            raise DatasetError(
                f"the ZIP holds {len(entries):,} entries; at most {limits.max_zip_entries:,} are allowed"
            )
        declared = sum(info.file_size for info in entries)
        if declared > limits.max_uncompressed_bytes:
            raise DatasetError(
                f"the ZIP's files declare {declared:,} bytes uncompressed; at most "
                f"{limits.max_uncompressed_bytes:,} are allowed"
            )
    except BaseException:
        archive.close()
        raise
    return archive


def _entry_path(info: zipfile.ZipInfo) -> list[str] | None:
    """The entry's path components, or None for what is skipped silently (folders, macOS and hidden files)."""
    name = info.filename.replace("\\", "/")
    if info.is_dir() or name.endswith("/"):
        return None
    parts = [p for p in name.split("/") if p]
    if not parts or parts[0] == "__MACOSX" or any(p.startswith(".") for p in parts):
        return None
    return parts


def _oversize(info: zipfile.ZipInfo, limits: DatasetLimits) -> str | None:
    """Why the entry is refused unread from its declared sizes, or None."""
    most = limits.max_image_bytes
    if info.file_size > most or info.compress_size > most:
        size = max(info.file_size, info.compress_size)
        return f"the file is {size:,} bytes; at most {most:,} per image"
    if info.file_size > _RATIO_FLOOR_BYTES and info.file_size > MAX_COMPRESSION_RATIO * max(info.compress_size, 1):
        return (
            f"the file claims {info.file_size:,} bytes compressed into {info.compress_size:,}, more than "
            f"{MAX_COMPRESSION_RATIO}:1 (a ZIP bomb?)"
        )
    return None


def _read_entry(archive: zipfile.ZipFile, info: zipfile.ZipInfo, limits: DatasetLimits) -> bytes:
    """The entry's bytes, inflating no more than the limit whatever its header claims."""
    with archive.open(info) as entry:
        data = entry.read(limits.max_image_bytes + 1)
    if len(data) > limits.max_image_bytes:
        raise _Oversize(f"the file inflates past {limits.max_image_bytes:,} bytes, the limit per image")
    return data


class _Oversize(Exception):
    pass


class _NotAnImage(Exception):
    pass


def _check_image(data: bytes, limits: DatasetLimits) -> None:
    """Header and structure of an encoded image (pixels decoded only for JPEG, at 1/8 scale): raises _NotAnImage,
    _Oversize, or anything else for a corrupt file."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        try:
            with Image.open(io.BytesIO(data), formats=IMAGE_FORMATS) as opened:
                width, height = opened.size
                fmt = opened.format
        except Image.DecompressionBombError as e:
            raise _Oversize(f"{e}; at most {limits.max_image_pixels:,} pixels") from None
        except UnidentifiedImageError:
            what = sniff_format(data)
            if what in IMAGE_FORMATS:
                raise ValueError(f"its {what} header cannot be read (a truncated or damaged file?)") from None
            if what:
                raise _NotAnImage(f"a {what} image, which is not supported; use {IMAGE_FORMATS_TEXT}") from None
            raise _NotAnImage(f"not a {IMAGE_FORMATS_TEXT} image") from None
        if width * height > limits.max_image_pixels:
            raise _Oversize(
                f"the {fmt} image is {width}x{height} = {width * height:,} pixels; at most {limits.max_image_pixels:,}"
            )
        if width < 1 or height < 1:
            raise ValueError(f"the {fmt} header declares a {width}x{height} image")
        with Image.open(io.BytesIO(data), formats=IMAGE_FORMATS) as fresh:
            fresh.verify()
        if fmt == "JPEG":
            # verify() reads no JPEG data: decode at 1/8 scale (cheap) so that a truncated file shows here.
            with Image.open(io.BytesIO(data), formats=IMAGE_FORMATS) as small:
                small.draft("RGB", (max(width // 8, 1), max(height // 8, 1)))
                small.load()


def _parse_zip(path: Path, out: _Collector) -> None:
    limits = out.limits
    with _open_zip(path, limits) as archive:
        entries = [(index, info, _entry_path(info)) for index, info in enumerate(archive.infolist())]
        files = [(index, info, parts) for index, info, parts in entries if parts is not None]
        names = Counter(info.filename for _, info, _ in files)
        # One folder around everything (dataset/cats/1.jpg ...) is not a label: strip it.
        tops = {parts[0] for _, _, parts in files}
        strip = len(tops) == 1 and any(len(parts) > 2 for _, _, parts in files)
        for index, info, parts in files:
            line, member = index + 1, info.filename
            out.row()
            inside = parts[1:] if strip else parts
            if names[member] > 1:
                out.issue(line, BAD_ROW, f"the ZIP holds {names[member]} files named {member!r}; rename them", member)
                continue
            if len(inside) == 1:
                out.issue(
                    line,
                    BAD_ROW,
                    "the file is not in a folder; put each image in a folder named after its label",
                    member,
                )
                continue
            if len(inside) > 2:
                out.issue(
                    line,
                    BAD_ROW,
                    "the file is nested too deep; images go directly in one folder per label (label/image.jpg)",
                    member,
                )
                continue
            label = inside[0].strip()
            if not label:
                out.issue(line, MISSING_LABEL, "the folder name (the label) is empty", member)
                continue
            if not out.check_label(line, label, member):
                continue
            problem = _oversize(info, limits)
            if problem:
                out.issue(line, OVERSIZE_IMAGE, problem, member)
                continue
            try:
                data = _read_entry(archive, info, limits)
                if not data:
                    raise _NotAnImage("the file is empty")
                _check_image(data, limits)
            except _Oversize as e:
                out.issue(line, OVERSIZE_IMAGE, str(e), member)
                continue
            except _NotAnImage as e:
                out.issue(line, NOT_AN_IMAGE, str(e), member)
                continue
            except MemoryError:
                raise
            except Exception as e:  # CRC errors, truncated streams, bad headers: whatever a broken file raises
                out.issue(line, CORRUPT_IMAGE, f"the image cannot be read: {e or type(e).__name__}", member)
                continue
            out.keep(line, member, label, hashlib.sha256(data).hexdigest(), member)


# -- the entry points ------------------------------------------------------------------------------------------------


def parse_dataset(
    path: Path,
    *,
    task: int,
    fmt: int = 0,
    text_column: str = "",
    label_column: str = "",
    limits: DatasetLimits = DatasetLimits(),
) -> ParsedDataset:
    """Reads and validates the dataset file at ``path`` for ``task``: the kept rows in file order and the report.
    ``fmt`` 0 is detected from the task and the file's first bytes; ``text_column``/``label_column`` name the CSV
    columns or JSON fields ("text" and "label" when empty). Raises DatasetError when the file cannot be used."""
    if task not in TASK_NAMES:
        raise DatasetError(
            f"the training task is {task}; it must be text classification ({TEXT_TASK}) or image classification "
            f"({IMAGE_TASK})"
        )
    try:
        with path.open("rb") as file:
            head = file.read(4096)
    except OSError as e:
        raise DatasetError(f"the dataset file cannot be read: {e.strerror or e}") from None
    if not head:
        raise DatasetError("the dataset file is empty")
    fmt = fmt or detect_format(head, task)
    if fmt not in FORMAT_NAMES:
        raise DatasetError(f"the dataset format is {fmt}; it must be CSV ({CSV}), JSONL ({JSONL}) or ZIP ({ZIP})")
    if (fmt == ZIP) != (task == IMAGE_TASK):
        wanted = "a ZIP of images in one folder per label" if task == IMAGE_TASK else "CSV or JSONL"
        raise DatasetError(f"{TASK_NAMES[task]} needs {wanted}; the file is {FORMAT_NAMES[fmt]}")
    out = _Collector(limits)
    if fmt == ZIP:
        _parse_zip(path, out)
    else:
        with path.open("rb") as file:
            if fmt == CSV:
                _parse_csv(file, text_column or "text", label_column or "label", out)
            else:
                _parse_jsonl(file, text_column or "text", label_column or "label", out)
    return out.finish(task, fmt)


class ZipImages:
    """An image ZIP kept open to read many of its images: ``with ZipImages(path) as images: images.open(member)``."""

    def __init__(self, zip_path: Path, limits: DatasetLimits = DatasetLimits()) -> None:
        self.limits = limits
        self.archive = _open_zip(zip_path, limits)

    def __enter__(self) -> ZipImages:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self.archive.close()

    def open(self, member: str) -> Image.Image:
        """The image ``member`` decoded, upright (EXIF orientation applied), as RGB; DatasetError when it cannot be."""
        try:
            info = self.archive.getinfo(member)
        except KeyError:
            raise DatasetError(f"the ZIP holds no file {member!r}") from None
        problem = _oversize(info, self.limits)
        if problem:
            raise DatasetError(f"{member}: {problem}")
        try:
            data = _read_entry(self.archive, info, self.limits)
            _check_image(data, self.limits)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", Image.DecompressionBombWarning)
                with Image.open(io.BytesIO(data), formats=IMAGE_FORMATS) as opened:
                    opened.load()
                    image = _to_eight_bit(opened)
                    if image.mode in ("P", "PA", "1"):
                        image = image.convert("RGBA" if "transparency" in image.info or image.mode == "PA" else "RGB")
                    with contextlib.suppress(Exception):  # a malformed EXIF block: the picture as stored
                        image = ImageOps.exif_transpose(image)
                    return image.convert("RGB")
        except MemoryError:
            raise
        except Exception as e:
            raise DatasetError(f"{member}: the image cannot be read ({e or type(e).__name__})") from None


def _to_eight_bit(image: Image.Image) -> Image.Image:
    """16- and 32-bit greyscale → 8-bit greyscale, keeping the top 8 bits (Pillow's own conversion clips)."""
    if image.mode.startswith("I;16") or image.mode == "I":
        import numpy as np

        array = np.asarray(image).astype(np.int64)
        top = int(array.max()) if array.size else 0
        shift = 8 if image.mode.startswith("I;16") or top > 255 else 0
        return Image.fromarray(np.clip(array >> shift, 0, 255).astype(np.uint8))
    return image


def open_image(zip_path: Path, member: str, limits: DatasetLimits = DatasetLimits()) -> Image.Image:
    """One image of an image ZIP, decoded as RGB (EXIF orientation applied), checked like ``parse_dataset`` checks
    it; DatasetError when it cannot be read. To read many, keep the ZIP open with ``ZipImages``."""
    with ZipImages(zip_path, limits) as images:
        return images.open(member)


def preview(parsed: ParsedDataset, rows: int) -> list[datasets_pb2.PreviewRow]:
    """The first ``rows`` kept rows, as DescribeDataset shows them."""
    return [datasets_pb2.PreviewRow(text=e.text, label=e.label) for e in parsed.examples[: max(rows, 0)]]

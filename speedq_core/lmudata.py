"""LMUData: the folder of benchmark TSVs VLMEvalKit reads (``$LMUData/<Name>.tsv``), and checks of
the TSVs speedq is handed, so a bad file fails in a second with a sentence instead of mid-run.

No VLMEvalKit import here: this module is cheap and usable by data generators.

VLMEvalKit semantics kept: the folder is ``$LMUData`` if set, else ``~/LMUData``. One it silently
lacks (VLMEvalKit then falls back to ``~/LMUData``) is created here, or reported if it cannot be.
"""
from __future__ import annotations

import ast
import base64
import csv
import io
import os
import sys
import tempfile
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from speedq_core.errors import SpeedqError

ENV_VAR = "LMUData"
# Columns a custom benchmark TSV needs (besides ``image`` or ``image_path``), by kind.
REQUIRED_COLUMNS = {"MCQ": ("index", "question", "A", "B", "answer"), "Y/N": ("index", "question", "answer")}
IMAGE_ROWS_CHECKED = 3


class BenchmarkError(SpeedqError):
    """A benchmark that cannot be evaluated as asked: missing, unknown, malformed or unsupported."""


def resolve_lmudata(lmudata: str | os.PathLike | None = None) -> Path:
    """The LMUData folder: ``lmudata``, else ``$LMUData``, else ``~/LMUData``; created if absent."""
    if lmudata is None:
        lmudata = os.environ.get(ENV_VAR) or Path.home() / "LMUData"
    root = Path(lmudata).expanduser().absolute()
    if root.is_dir():
        return root
    if root.exists():
        raise BenchmarkError(f"LMUData path {root} is a file, not a folder: pass a folder as LMUData")
    try:
        root.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise BenchmarkError(
            f"cannot create the LMUData folder {root} ({err.strerror}): pass a folder you can write to"
        ) from err
    return root


def ensure_writable(root: Path) -> None:
    """Raise unless a file can be created in ``root`` (probed by creating one, which also works
    where permission bits do not tell, e.g. for root on a read-only mount)."""
    try:
        fd, probe = tempfile.mkstemp(prefix=".speedq-write-probe-", dir=root)
    except OSError as err:
        raise BenchmarkError(
            f"LMUData folder {root} is not writable ({err.strerror}): pass a writable folder as LMUData "
            "or make this one writable"
        ) from err
    os.close(fd)
    os.unlink(probe)


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` through a temp file in the same folder and an atomic rename."""
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def local_benchmarks(root: Path) -> list[str]:
    """Names of the TSVs in ``root`` (each is a benchmark VLMEvalKit can build by name)."""
    return sorted(p.stem for p in root.glob("*.tsv") if not p.stem.endswith("_local"))


def _read_table(path: Path) -> tuple[list[str], list[dict[str, str]]]:
    csv.field_size_limit(sys.maxsize)  # base64 images are long fields
    with path.open(newline="", encoding="utf-8") as handle:
        reader = csv.DictReader(handle, delimiter="\t")
        rows = list(reader)
        return list(reader.fieldnames or []), rows


def inspect_custom_tsv(path: Path) -> str:
    """Check a custom (non-VLMEvalKit) benchmark TSV and return how it is scored: ``"MCQ"`` (has
    option columns A, B, ...) or ``"Y/N"`` (answers are all Yes/No).

    Checks: readable as a tab-separated table with rows; the columns of its kind; ``image`` (base64)
    or ``image_path``; the first images decode; MCQ answers are letters of existing option columns.
    """
    name = path.stem
    try:
        columns, rows = _read_table(path)
    except (OSError, UnicodeDecodeError, csv.Error) as err:
        raise BenchmarkError(f"benchmark {name}: cannot read {path} as a TSV ({err}): rewrite it as "
                             "tab-separated UTF-8 text with a header row") from err
    if not rows:
        raise BenchmarkError(f"benchmark {name}: {path} has no rows: add at least one question")
    options = [c for c in "ABCDEFGHIJ" if c in columns]
    if len(options) >= 2:
        kind = "MCQ"
    elif {r.get("answer", "").strip() for r in rows} <= {"Yes", "No"} and "answer" in columns:
        kind = "Y/N"
    else:
        raise BenchmarkError(
            f"benchmark {name}: {path} has no option columns A, B and its answers are not all Yes/No: "
            "speedq scores custom benchmarks as multiple choice (add columns A, B, ... and a letter "
            "answer) or yes/no (answers Yes or No)"
        )
    missing = [c for c in REQUIRED_COLUMNS[kind] if c not in columns]
    if "image" not in columns and "image_path" not in columns:
        missing.append("image")
    if missing:
        raise BenchmarkError(
            f"benchmark {name}: {path} lacks column(s) {', '.join(missing)}: add them (a custom "
            f"{kind} TSV needs {', '.join(REQUIRED_COLUMNS[kind])} and image as base64)"
        )
    if kind == "MCQ":
        bad = sorted({r["answer"] for r in rows if r["answer"].strip() not in options})
        if bad:
            raise BenchmarkError(
                f"benchmark {name}: answers {', '.join(map(repr, bad[:5]))} in {path} are not option "
                f"letters ({', '.join(options)}): write the answer as the letter of the right option"
            )
    _check_images(name, path, columns, rows)
    return kind


def _check_images(name: str, path: Path, columns: list[str], rows: list[dict[str, str]]) -> None:
    """Decode the first images (``image`` cells of <= 64 characters refer to another row's index,
    VLMEvalKit's way to share an image, and are skipped); or check ``image_path`` files exist."""
    from PIL import Image

    if "image" in columns:
        checked = 0
        for row in rows:
            cell = row["image"]
            if len(cell) <= 64:
                continue
            try:
                if cell.startswith("["):  # several images: VLMEvalKit stores a Python list literal
                    cell = str(ast.literal_eval(cell)[0])
                with Image.open(io.BytesIO(base64.b64decode(cell, validate=False))) as image:
                    image.load()
            except Exception as err:
                raise BenchmarkError(
                    f"benchmark {name}: the image of row index={row.get('index')} in {path} does not "
                    f"decode ({type(err).__name__}): store each image as base64 of a PNG or JPEG file"
                ) from err
            checked += 1
            if checked == IMAGE_ROWS_CHECKED:
                break
        return
    images_dir = path.parent / "images" / name
    for row in rows[:IMAGE_ROWS_CHECKED]:
        cell = row["image_path"]
        if not (Path(cell).is_file() or (images_dir / cell).is_file()):
            raise BenchmarkError(
                f"benchmark {name}: image_path {cell!r} of row index={row.get('index')} is not a file: "
                f"give absolute paths or paths relative to {images_dir}"
            )


@dataclass(frozen=True)
class GeneratedBenchmark:
    """A benchmark a plugin writes on demand: ``write(lmudata_dir)`` returns the TSV it wrote."""

    name: str
    write: Callable[[Path], Path]
    description: str = ""
    # (n, seed) -> (PIL image, prompt, answer) triples: lets the benchmark serve as calibration /
    # training data (e.g. a train split); None when it is evaluation-only.
    samples: Callable[[int, int], Iterable[tuple[Any, str, str]]] | None = None

"""SpeedqSynth: a seeded synthetic multiple-choice benchmark of shapes, colours, counts and positions.

Small images (``size`` px square, default 48: the tiny models' input) with one 4-option question
each, in seven categories. Two kinds of category are mixed on purpose:

    coarse  color, shape                   one big object, distractors far from the truth
    fine    hue, count, size, position,    the answer hinges on a small margin: hues ~30 degrees
            majority                       apart, 7 vs 8 objects, radii or coordinates 2-5 px
                                           apart, majority colour ahead by one dot

A model that solves the coarse questions keeps solving them under heavy weight noise; the fine ones
degrade gradually as quantization error grows, the way real 1-2B VLMs lose points on counting, OCR
and spatial questions at 2 bits while staying near their float accuracy at 4 bits. Every question
uses only words of the tiny tokenizer's vocabulary.

Determinism: sample ``i`` of split ``s`` draws from ``random.Random("speedq-synth/{seed}/{s}/{i}")``
(string seeds hash with SHA-512, independent of ``PYTHONHASHSEED``) and numpy's PCG64 for the pixel
noise, so the same seed gives byte-identical images and TSV files. Train and test use different
seed strings. Answer letters are balanced within each category (every 4 consecutive questions of a
category use each letter once, in a seeded order).

Two ways in:
  * :func:`iter_samples` yields :class:`SynthSample` (PIL image, question, options, answer letter)
    for training and calibration; ``sample.prompt`` is the exact evaluation prompt.
  * :func:`write_benchmark` writes ``$LMUData/SpeedqSynth_TEST.tsv`` (or ``_TRAIN``) in VLMEvalKit's
    MCQ format (index, image as base64 PNG, question, A-D, answer letter, category), atomically.
"""
from __future__ import annotations

import base64
import colorsys
import csv
import io
import math
import random
import shutil
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from speedq_core.evaluate import mcq_prompt
from speedq_core.hookspecs import hookimpl
from speedq_core.lmudata import GeneratedBenchmark, atomic_write_bytes, ensure_writable, resolve_lmudata

CATEGORIES = ("color", "shape", "hue", "count", "size", "position", "majority")
SPLITS = ("train", "test")
LETTERS = "ABCD"
DEFAULT_SIZE = 48
DEFAULT_NOISE = 6  # +- grey levels of uniform pixel noise
TSV_COLUMNS = ("index", "image", "question", "A", "B", "C", "D", "answer", "category")

# Benchmark name -> (split, default number of rows). 100 test questions per category.
BENCHMARKS: dict[str, tuple[str, int]] = {
    "SpeedqSynth_TEST": ("test", 100 * len(CATEGORIES)),
    "SpeedqSynth_TRAIN": ("train", 1000 * len(CATEGORIES)),
}

# Twelve named hues, 30 degrees apart (HSV hue in degrees). "hue" questions use neighbours as
# distractors; object identities use the six 60-degree-apart "basic" hues plus white.
HUES: dict[str, float] = {
    "red": 0, "orange": 30, "yellow": 60, "lime": 90, "green": 120, "teal": 150,
    "cyan": 180, "blue": 215, "indigo": 245, "violet": 275, "magenta": 305, "crimson": 335,
}
BASIC_COLORS = ("red", "yellow", "green", "blue", "magenta", "white")  # hues >= 55 degrees apart
HUE_JITTER = 8.0  # degrees; neighbours are 25-35 degrees apart, so 4.5-9.5 degrees of margin remain
SHAPES = ("circle", "square", "triangle", "cross", "star", "ring", "diamond")
PLURAL = {
    "circle": "circles", "square": "squares", "triangle": "triangles", "cross": "crosses",
    "star": "stars", "ring": "rings", "diamond": "diamonds", "dot": "dots",
}
BACKGROUND = 28


@dataclass(frozen=True)
class SynthSample:
    """One question: ``options[i]`` is the text of letter ``"ABCD"[i]``; ``answer`` is a letter."""

    index: int
    category: str
    image: Image.Image
    question: str
    options: tuple[str, ...]
    answer: str

    @property
    def prompt(self) -> str:
        """The user prompt the model sees at evaluation (see :func:`synthetic_mcq_prompt`)."""
        return synthetic_mcq_prompt(self.question, self.options)

    @property
    def answer_text(self) -> str:
        return self.options[LETTERS.index(self.answer)]


def synthetic_mcq_prompt(question: str, options: Sequence[str] | Mapping[str, str]) -> str:
    """``question\\nA. ..\\nB. ..\\nC. ..\\nD. ..\\nAnswer with the option's letter from the given
    choices directly.``: the MCQ prompt of VLMEvalKit's InternVL and LLaVA wrappers, which the
    evaluation bridge also uses, so training and evaluation see the same text."""
    if not isinstance(options, Mapping):
        options = dict(zip(LETTERS, options))
    return mcq_prompt(question, options)


# -- sampling -------------------------------------------------------------------------------------


def _check_split(split: str) -> None:
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}: use one of {', '.join(SPLITS)}")


def _answer_letter(seed: int, split: str, category: str, k: int) -> str:
    """Letter of the ``k``-th question of ``category``: each block of 4 is a seeded permutation."""
    order = list(LETTERS)
    random.Random(f"speedq-synth/{seed}/{split}/letters/{category}/{k // 4}").shuffle(order)
    return order[k % 4]


def generate_sample(
    index: int, split: str = "train", seed: int = 0, size: int = DEFAULT_SIZE, noise: int = DEFAULT_NOISE
) -> SynthSample:
    """Sample ``index`` of ``split``: category ``CATEGORIES[index % 7]``, fully determined by the args."""
    _check_split(split)
    if size < 32:
        raise ValueError(f"image size {size} is too small for the synthetic benchmark: use 32 px or more")
    category = CATEGORIES[index % len(CATEGORIES)]
    letter = _answer_letter(seed, split, category, index // len(CATEGORIES))
    rng = random.Random(f"speedq-synth/{seed}/{split}/{index}")
    canvas = _Canvas(size)
    question, truth, distractors = _MAKERS[category](rng, canvas)
    options = _arrange(rng, truth, distractors, letter)
    image = canvas.render(noise, rng.getrandbits(64))
    return SynthSample(index, category, image, question, options, letter)


def iter_samples(
    split: str,
    n: int,
    seed: int = 0,
    size: int = DEFAULT_SIZE,
    noise: int = DEFAULT_NOISE,
    start: int = 0,
) -> Iterator[SynthSample]:
    """Samples ``start .. start+n-1`` of ``split`` (train and test never share a seed)."""
    for index in range(start, start + n):
        yield generate_sample(index, split, seed, size, noise)


def _arrange(rng: random.Random, truth: str, distractors: Sequence[str], letter: str) -> tuple[str, ...]:
    """Options with ``truth`` at ``letter`` and the three distractors shuffled into the other slots."""
    rest = list(distractors)
    assert len(rest) == 3 and truth not in rest and len(set(rest)) == 3, (truth, rest)
    rng.shuffle(rest)
    rest.insert(LETTERS.index(letter), truth)
    return tuple(rest)


# -- drawing --------------------------------------------------------------------------------------


def _rgb(rng: random.Random, name: str) -> tuple[int, int, int]:
    """A jittered RGB for a colour name (hue +- HUE_JITTER, saturation and value varied)."""
    if name == "white":
        level = rng.randint(220, 250)
        return (level, level, level)
    hue = (HUES[name] + rng.uniform(-HUE_JITTER, HUE_JITTER)) % 360
    r, g, b = colorsys.hsv_to_rgb(hue / 360, rng.uniform(0.75, 0.95), rng.uniform(0.8, 0.97))
    return (round(r * 255), round(g * 255), round(b * 255))


class _Canvas:
    """Objects to draw: (shape, centre x, centre y, radius, rgb). ``u`` is the pixel unit (size/48)."""

    def __init__(self, size: int):
        self.size = size
        self.u = size / DEFAULT_SIZE
        self.objects: list[tuple[str, int, int, int, tuple[int, int, int]]] = []

    def px(self, value: float) -> int:
        """``value`` pixels of the 48-px design, scaled to this canvas (at least 1)."""
        return max(1, round(value * self.u))

    def add(self, shape: str, x: int, y: int, r: int, rgb: tuple[int, int, int]) -> None:
        self.objects.append((shape, x, y, r, rgb))

    def free(self, x: int, y: int, r: int) -> bool:
        """Whether a radius-``r`` object at (x, y) is inside the canvas and clear of the others."""
        margin = 1
        if not (r + margin <= x < self.size - r - margin and r + margin <= y < self.size - r - margin):
            return False
        gap = self.px(1.5)
        return all(math.hypot(x - ox, y - oy) >= r + orad + gap for _, ox, oy, orad, _ in self.objects)

    def place(self, rng: random.Random, r: int, tries: int = 400) -> tuple[int, int]:
        """A random free centre for a radius-``r`` object."""
        lo, hi = r + 1, self.size - r - 2
        for _ in range(tries):
            x, y = rng.randint(lo, hi), rng.randint(lo, hi)
            if self.free(x, y, r):
                return x, y
        raise _NoRoom

    def render(self, noise: int, noise_seed: int) -> Image.Image:
        image = Image.new("RGB", (self.size, self.size), (BACKGROUND,) * 3)
        draw = ImageDraw.Draw(image)
        for shape, x, y, r, rgb in self.objects:
            _draw_shape(draw, shape, x, y, r, rgb)
        if noise:
            pixels = np.asarray(image, dtype=np.int16)
            jitter = np.random.Generator(np.random.PCG64(noise_seed)).integers(
                -noise, noise + 1, size=pixels.shape, dtype=np.int16
            )
            image = Image.fromarray(np.clip(pixels + jitter, 0, 255).astype(np.uint8), "RGB")
        return image


class _NoRoom(Exception):
    """A layout did not fit; the maker retries with a fresh layout."""


def _draw_shape(draw: ImageDraw.ImageDraw, shape: str, x: int, y: int, r: int, rgb) -> None:
    if shape in ("circle", "dot"):
        draw.ellipse((x - r, y - r, x + r, y + r), fill=rgb)
    elif shape == "ring":
        draw.ellipse((x - r, y - r, x + r, y + r), outline=rgb, width=max(1, round(r / 3)))
    elif shape == "square":
        h = max(1, round(r * 0.85))
        draw.rectangle((x - h, y - h, x + h, y + h), fill=rgb)
    elif shape == "diamond":
        draw.polygon([(x, y - r), (x + r, y), (x, y + r), (x - r, y)], fill=rgb)
    elif shape == "triangle":
        draw.polygon([(x, y - r), (x + r, y + round(r * 0.8)), (x - r, y + round(r * 0.8))], fill=rgb)
    elif shape == "cross":
        t = max(1, round(r / 3))
        draw.rectangle((x - r, y - t, x + r, y + t), fill=rgb)
        draw.rectangle((x - t, y - r, x + t, y + r), fill=rgb)
    elif shape == "star":
        points = []
        for k in range(10):
            radius = r if k % 2 == 0 else r * 0.45
            angle = -math.pi / 2 + k * math.pi / 5
            points.append((x + radius * math.cos(angle), y + radius * math.sin(angle)))
        draw.polygon(points, fill=rgb)
    else:
        raise ValueError(f"unknown shape {shape!r}")


def _retrying(maker: Callable[[random.Random, _Canvas], tuple[str, str, list[str]]]):
    """Run a maker on a fresh canvas until its layout fits (deterministic: same rng stream)."""

    def run(rng: random.Random, canvas: _Canvas) -> tuple[str, str, list[str]]:
        for _ in range(100):
            canvas.objects.clear()
            try:
                return maker(rng, canvas)
            except _NoRoom:
                continue
        raise RuntimeError("synthetic layout failed 100 times: use a larger image size")

    return run


# -- categories -----------------------------------------------------------------------------------
# Each maker draws on the canvas and returns (question, true option text, three distractor texts).


def _far_colors(rng: random.Random, truth: str) -> list[str]:
    return rng.sample([c for c in BASIC_COLORS if c != truth], 3)


@_retrying
def _color(rng: random.Random, canvas: _Canvas):
    """Coarse: one big object in a basic colour; distractors are other basic colours (>= 60 deg)."""
    shape, truth = rng.choice(SHAPES), rng.choice(BASIC_COLORS)
    r = canvas.px(rng.uniform(8, 13))
    canvas.add(shape, *canvas.place(rng, r), r, _rgb(rng, truth))
    return f"What color is the {shape}?", truth, _far_colors(rng, truth)


@_retrying
def _shape(rng: random.Random, canvas: _Canvas):
    """Coarse: one big object; which of seven shapes."""
    truth = rng.choice(SHAPES)
    r = canvas.px(rng.uniform(9, 14))
    canvas.add(truth, *canvas.place(rng, r), r, _rgb(rng, rng.choice(BASIC_COLORS)))
    return "What shape is in the image?", truth, rng.sample([s for s in SHAPES if s != truth], 3)


@_retrying
def _hue(rng: random.Random, canvas: _Canvas):
    """Fine: one object of one of 12 hues; distractors are both neighbours (25-35 degrees away)
    and the hue two steps away on one side."""
    names = list(HUES)
    i = rng.randrange(len(names))
    side = rng.choice((-2, 2))
    distractors = [names[(i - 1) % 12], names[(i + 1) % 12], names[(i + side) % 12]]
    shape = rng.choice(("circle", "square", "diamond", "star"))
    r = canvas.px(rng.uniform(6, 11))
    canvas.add(shape, *canvas.place(rng, r), r, _rgb(rng, names[i]))
    return f"What color is the {shape}?", names[i], distractors


def _near_numbers(rng: random.Random, truth: int, lo: int = 0, hi: int = 12) -> list[str]:
    """The three numbers in [lo, hi] closest to ``truth`` (ties broken at random)."""
    pool = [k for k in range(lo, hi + 1) if k != truth]
    rng.shuffle(pool)
    pool.sort(key=lambda k: abs(k - truth))
    return [str(k) for k in pool[:3]]


@_retrying
def _count(rng: random.Random, canvas: _Canvas):
    """Fine: 1-8 small objects of one shape (sometimes with 1-3 objects of another shape and colour
    mixed in); distractors are the closest other counts."""
    shape, other = rng.sample(("dot", "square", "triangle", "cross"), 2)
    color, other_color = rng.sample(BASIC_COLORS, 2)
    n = rng.randint(1, 8)
    r = canvas.px(3)
    for _ in range(n):
        canvas.add(shape, *canvas.place(rng, r), r, _rgb(rng, color))
    if rng.random() < 0.5:
        for _ in range(rng.randint(1, 3)):
            canvas.add(other, *canvas.place(rng, r), r, _rgb(rng, other_color))
    return f"How many {PLURAL[shape]} are there in the image?", str(n), _near_numbers(rng, n)


@_retrying
def _size(rng: random.Random, canvas: _Canvas):
    """Fine: four objects of one shape and four basic colours; the largest (or smallest) beats the
    runner-up by only 2-4 px of radius."""
    shape = rng.choice(("circle", "square", "diamond"))
    colors = rng.sample(BASIC_COLORS, 4)
    delta = canvas.px(rng.choice((2, 2, 3, 3, 4)))
    if rng.random() < 0.5:
        word, second = "largest", canvas.px(rng.uniform(4, 8))
        extreme = second + delta
        others = [second] + [rng.randint(canvas.px(3), second) for _ in range(2)]
    else:
        word, second = "smallest", canvas.px(rng.uniform(5, 9))
        extreme = max(1, second - delta)
        others = [second] + [rng.randint(second, canvas.px(10)) for _ in range(2)]
    for color, r in zip(colors, [extreme] + others):
        canvas.add(shape, *canvas.place(rng, r), r, _rgb(rng, color))
    return f"Which {shape} is the {word}?", colors[0], colors[1:]


@_retrying
def _position(rng: random.Random, canvas: _Canvas):
    """Fine: four small objects in four basic colours; the one most to one side leads the next
    by only 4-7 px. Laid out for "left", then mirrored or transposed for the other sides."""
    side = rng.choice(("left", "right", "top", "bottom"))
    colors = rng.sample(BASIC_COLORS, 4)
    radii = [canvas.px(rng.uniform(3, 4.5)) for _ in colors]
    delta = canvas.px(rng.choice((4, 5, 6, 7)))
    size, edge = canvas.size, max(radii) + 1
    x_first = rng.randint(edge, size // 2)
    xs = [x_first, x_first + delta] + [rng.randint(x_first + delta, size - edge - 1) for _ in range(2)]
    for color, x, r in zip(colors, xs, radii):
        for _ in range(200):
            y = rng.randint(edge, size - edge - 1)
            px, py = {"left": (x, y), "right": (size - 1 - x, y), "top": (y, x), "bottom": (y, size - 1 - x)}[side]
            if canvas.free(px, py, r):
                canvas.add(rng.choice(("circle", "square", "diamond")), px, py, r, _rgb(rng, color))
                break
        else:
            raise _NoRoom
    where = "to the" if side in ("left", "right") else "at the"
    return f"Which color is the object most {where} {side}?", colors[0], colors[1:]


@_retrying
def _majority(rng: random.Random, canvas: _Canvas):
    """Fine: dots of four colours; the most frequent colour leads the runner-up by one dot."""
    colors = rng.sample(BASIC_COLORS, 4)
    top = rng.randint(2, 5)
    counts = [top, top - 1] + [rng.randint(0, top - 1) for _ in range(2)]
    r = canvas.px(2.5)
    for color, count in zip(colors, counts):
        for _ in range(count):
            canvas.add("dot", *canvas.place(rng, r), r, _rgb(rng, color))
    return "Which color are most of the dots?", colors[0], colors[1:]


_MAKERS = {
    "color": _color, "shape": _shape, "hue": _hue, "count": _count,
    "size": _size, "position": _position, "majority": _majority,
}
assert tuple(_MAKERS) == CATEGORIES


# -- TSV ------------------------------------------------------------------------------------------


def _png_base64(image: Image.Image) -> str:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", optimize=False, compress_level=9)
    return base64.b64encode(buffer.getvalue()).decode("ascii")


def tsv_bytes(
    split: str, n: int, seed: int = 0, size: int = DEFAULT_SIZE, noise: int = DEFAULT_NOISE
) -> bytes:
    """The VLMEvalKit MCQ TSV of samples ``0 .. n-1`` of ``split`` (columns ``TSV_COLUMNS``)."""
    buffer = io.StringIO()
    writer = csv.writer(buffer, delimiter="\t", lineterminator="\n")
    writer.writerow(TSV_COLUMNS)
    for s in iter_samples(split, n, seed, size, noise):
        writer.writerow([s.index, _png_base64(s.image), s.question, *s.options, s.answer, s.category])
    return buffer.getvalue().encode("utf-8")


def write_benchmark(
    name: str = "SpeedqSynth_TEST",
    lmudata: str | Path | None = None,
    n: int | None = None,
    seed: int = 0,
    size: int = DEFAULT_SIZE,
    noise: int = DEFAULT_NOISE,
) -> Path:
    """Write ``$LMUData/<name>.tsv`` (temp file + rename) unless it already holds exactly these bytes.

    When the file changes, VLMEvalKit's decoded-image cache ``$LMUData/images/<name>/`` is removed
    too, since VLMEvalKit never refreshes it. Returns the TSV path.
    """
    if name not in BENCHMARKS:
        raise ValueError(f"unknown synthetic benchmark {name!r}: use one of {', '.join(BENCHMARKS)}")
    split, default_n = BENCHMARKS[name]
    root = resolve_lmudata(lmudata)
    path = root / f"{name}.tsv"
    data = tsv_bytes(split, default_n if n is None else n, seed, size, noise)
    if path.is_file() and path.read_bytes() == data:
        return path
    ensure_writable(root)
    atomic_write_bytes(path, data)
    shutil.rmtree(root / "images" / name, ignore_errors=True)
    return path


def benchmark_generators() -> dict[str, Callable[[Path], Path]]:
    """Benchmarks this module writes on demand: name -> ``fn(lmudata_dir) -> tsv path``.

    Pass to :func:`speedq_core.evaluate.check_benchmarks` / ``evaluate`` as ``generators``.
    """
    return {name: (lambda root, name=name: write_benchmark(name, root)) for name in BENCHMARKS}


def training_triples(split: str, n: int, seed: int = 0) -> Iterator[tuple[Image.Image, str, str]]:
    """``(image, MCQ prompt, right option's text)`` for training and calibration: the prompt the
    evaluation asks and the answer the tiny models were trained to give (VLMEvalKit maps an
    option's text to its letter).

    ``seed`` selects which ``n`` samples (a window of the split), so different seeds give different data.
    """
    for sample in iter_samples(split, n, start=seed * n):
        yield sample.image, sample.prompt, sample.answer_text


@hookimpl
def speedq_benchmarks() -> list[GeneratedBenchmark]:
    return [
        GeneratedBenchmark(
            name, write, f"speedq synthetic shapes/colours/counts MCQ ({name.split('_')[-1].lower()} split)",
            samples=(lambda n, seed, split=name.split("_")[-1].lower(): training_triples(split, n, seed)),
        )
        for name, write in benchmark_generators().items()
    ]

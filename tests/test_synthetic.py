"""The synthetic benchmark: determinism, balance, disjoint splits, vocabulary, TSV format."""
import base64
import csv
import hashlib
import io
import sys
from collections import Counter

import pytest
from PIL import Image

from speedq_plugins import synthetic
from speedq_plugins.tiny_tokenizer import build_tiny_tokenizer

N = 280  # 40 per category


def _rows(data: bytes) -> list[dict[str, str]]:
    csv.field_size_limit(sys.maxsize)
    return list(csv.DictReader(io.StringIO(data.decode()), delimiter="\t"))


def test_same_seed_gives_identical_tsv_and_other_seed_differs():
    first = synthetic.tsv_bytes("test", 70, seed=3)
    assert first == synthetic.tsv_bytes("test", 70, seed=3)
    assert first != synthetic.tsv_bytes("test", 70, seed=4)


def test_answer_letters_balanced_within_each_category():
    samples = list(synthetic.iter_samples("train", N))
    per_category = Counter((s.category, s.answer) for s in samples)
    assert set(per_category.values()) == {10}  # 40 per category, 10 per letter
    assert {s.category for s in samples} == set(synthetic.CATEGORIES)


def test_train_and_test_share_no_image():
    digest = lambda s: hashlib.sha256(s.image.tobytes()).hexdigest()  # noqa: E731
    train = {digest(s) for s in synthetic.iter_samples("train", N)}
    test = {digest(s) for s in synthetic.iter_samples("test", N)}
    assert len(train) == N and len(test) == N
    assert not train & test


def test_every_prompt_and_answer_is_in_the_tiny_vocabulary():
    tokenizer = build_tiny_tokenizer()
    for s in synthetic.iter_samples("test", N):
        text = s.prompt + " " + " ".join(s.options)
        ids = tokenizer(text)["input_ids"]
        assert tokenizer.unk_token_id not in ids, text


def test_options_are_distinct_with_the_answer_among_them():
    for s in synthetic.iter_samples("test", N):
        assert len(s.options) == 4 and len(set(s.options)) == 4
        assert s.answer in "ABCD" and s.answer_text == s.options["ABCD".index(s.answer)]


def test_fine_categories_use_close_distractors():
    for s in synthetic.iter_samples("test", N):
        if s.category == "count":
            truth = int(s.answer_text)
            assert max(abs(int(o) - truth) for o in s.options) <= 3
        if s.category == "hue":
            names = list(synthetic.HUES)
            i = names.index(s.answer_text)
            steps = {min((names.index(o) - i) % 12, (i - names.index(o)) % 12) for o in s.options}
            assert steps == {0, 1, 2}


def test_prompt_matches_vlmevalkit_mcq_wording():
    prompt = synthetic.synthetic_mcq_prompt("How many dots are there?", ["1", "2", "3", "4"])
    assert prompt == (
        "How many dots are there?\nA. 1\nB. 2\nC. 3\nD. 4\n"
        "Answer with the option's letter from the given choices directly."
    )


@pytest.mark.parametrize("size", [32, 64])
def test_image_size_is_configurable(size):
    s = synthetic.generate_sample(5, "test", size=size)
    assert s.image.size == (size, size) and s.image.mode == "RGB"


def test_write_benchmark_tsv_columns_and_images(tmp_path):
    path = synthetic.write_benchmark("SpeedqSynth_TEST", tmp_path, n=28)
    assert path == tmp_path / "SpeedqSynth_TEST.tsv"
    rows = _rows(path.read_bytes())
    assert list(rows[0]) == list(synthetic.TSV_COLUMNS)
    assert [r["index"] for r in rows] == [str(i) for i in range(28)]
    for row in rows:
        assert row["answer"] in "ABCD" and row["category"] in synthetic.CATEGORIES
        image = Image.open(io.BytesIO(base64.b64decode(row["image"])))
        assert image.format == "PNG" and image.size == (48, 48)
    assert not list(tmp_path.glob("*.tmp"))


def test_write_benchmark_rewrites_only_on_change_and_clears_image_cache(tmp_path):
    path = synthetic.write_benchmark("SpeedqSynth_TEST", tmp_path, n=14)
    stamp = path.stat().st_mtime_ns
    assert synthetic.write_benchmark("SpeedqSynth_TEST", tmp_path, n=14).stat().st_mtime_ns == stamp
    cache = tmp_path / "images" / "SpeedqSynth_TEST"
    cache.mkdir(parents=True)
    (cache / "0.png").write_bytes(b"stale")
    synthetic.write_benchmark("SpeedqSynth_TEST", tmp_path, n=14, seed=1)
    assert not cache.exists()


def test_generators_write_into_the_given_folder(tmp_path):
    generators = synthetic.benchmark_generators()
    assert set(generators) == {"SpeedqSynth_TEST", "SpeedqSynth_TRAIN"}
    path = generators["SpeedqSynth_TEST"](tmp_path)
    assert path.parent == tmp_path and len(_rows(path.read_bytes())) == 700


def test_training_triples_answer_with_the_options_text_and_prompt_of_evaluation():
    """The training/calibration data the synthetic plugin serves matches what the tiny models answer
    (the option's text) and what evaluation asks (the MCQ prompt)."""
    from speedq_plugins.synthetic import iter_samples, training_triples

    triples = list(training_triples("train", 7, seed=2))
    samples = list(iter_samples("train", 7, start=14))
    for (image, prompt, answer), s in zip(triples, samples):
        assert prompt == s.prompt and answer == s.answer_text and answer in s.options
        assert image.tobytes() == s.image.tobytes()

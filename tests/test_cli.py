"""The speedq command as a user runs it: a subprocess, its output and exit status."""
import os
import subprocess
import sys

import pytest


def speedq(*args, env=None, cwd=None):
    cmd = [sys.executable, "-c", "from speedq_core.cli import main; main()", *args]
    full_env = {**os.environ, "COLUMNS": "200", **(env or {})}
    return subprocess.run(cmd, capture_output=True, text=True, env=full_env, timeout=300, cwd=cwd)


def test_list_shows_families_methods_presets_and_their_plugins():
    out = speedq("list")
    assert out.returncode == 0, out.stderr
    for name in ("internvl", "qwen2_vl", "fast_vlm", "llava", "rtn", "internvl3-2b", "w2g16g16", "paper"):
        assert name in out.stdout


@pytest.mark.slow
def test_info_internvl3_1b_matches_the_paper():
    out = speedq("info", "internvl3-1b")
    assert out.returncode == 0, out.stderr
    rows = [line.strip("│ ") for line in out.stdout.splitlines()]
    total = next(row for row in rows if row.startswith("total"))
    vision = next(row for row in rows if row.startswith("vision "))
    # paper: "304M of 938M", BF16 1789.5 MiB. The real InternViT has q/k/v biases (0.07M): with them
    # the counts are 938.193M / 304.012M and the BF16 size is exactly the paper's 1789.5 MiB.
    assert "938.2M" in total and "1789.5" in total
    assert "304.0M" in vision  # 303.9M without the q/k/v biases the real InternViT has


@pytest.mark.parametrize(
    "args, match",
    [
        (("info", "internvl3-1c"), "did you mean 'internvl3-1b'"),
        (("info", "no-such-model"), "unknown model 'no-such-model'"),
        (("run", "--method", "gptqq", "--no-eval"), "did you mean 'gptq'"),
        (("run", "--scheme", "w4g12q", "--no-eval"), "unknown scheme 'w4g12q'"),
        (("run", "--bits", "5", "--no-eval"), "does not support 5-bit: use --bits 2, 3, 4, 8"),
        (("run", "--model", "internvl3-2b", "--no-eval"), "weights for internvl3-2b not found: pass --model-path"),
        (("run", "--components", "visoin", "--no-eval"), "did you mean 'vision'"),
    ],
)
def test_bad_names_give_one_line_and_exit_2(args, match, tmp_path):
    out = speedq(*args, cwd=tmp_path)
    assert out.returncode == 2
    assert match in out.stderr
    assert len(out.stderr.strip().splitlines()) == 1, out.stderr
    assert not any(tmp_path.iterdir())  # nothing written for a run that cannot start


def test_malformed_registry_is_one_line_error(tmp_path):
    bad = tmp_path / "registry.toml"
    bad.write_text('[models.x]\nfamily = "internvl"\n')
    out = speedq("list", env={"SPEEDQ_REGISTRY": str(bad)})
    assert out.returncode == 2
    assert "[models.x]" in out.stderr and len(out.stderr.strip().splitlines()) == 1

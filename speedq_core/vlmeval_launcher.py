"""VLMEvalKit's own ``run.py`` on speedq runs.

VLMEvalKit has no plugin mechanism: a model is visible to its CLI only through
``vlmeval.config.supported_VLM``. This launcher registers each speedq run directory given with
``--model`` under its run label, then hands the command line to ``vlmeval.run.main()``::

    python -m speedq_core.vlmeval_launcher --model runs/tiny-internvl-rtn-w4g128 \\
        --data SpeedqSynth_TEST --judge exact_matching --work-dir vlmeval_outputs

A run is loaded from its packed ``quantized/`` export (bit-exact with what speedq evaluated), or as
the float preset when the directory holds no export. Every other argument is run.py's own.
"""
from __future__ import annotations

import functools
import json
import sys
from pathlib import Path
from typing import Any

from speedq_core.errors import SpeedqError


def load_run(run_dir: str | Path) -> tuple[Any, Any, Any]:
    """(adapter, model, processor) of a speedq run directory, its quantized export applied."""
    from speedq_core.export import load_quantized
    from speedq_core.models import load_model
    from speedq_core.plugins import get_plugins
    from speedq_core.registry import load_registry

    run_dir = Path(run_dir)
    meta = run_dir / "run.json"
    if not meta.is_file():
        raise SpeedqError(f"{run_dir} is not a speedq run (no run.json): pass a folder made by `speedq run`")
    config = json.loads(meta.read_text())
    preset = load_registry().model(config["model"])
    adapter = get_plugins().family(preset.family)
    loaded = load_model(preset, adapter, config.get("model_path"), seed=config.get("seed", 42))
    if (run_dir / "quantized" / "quant_config.json").is_file():
        load_quantized(loaded.model, run_dir / "quantized")
    return adapter, loaded.model, loaded.processor


def checkpoint_vlm(run_dir: str) -> Any:
    """A VLMEvalKit model for ``run_dir``: speedq's wrapper, its prompt kind taken from each dataset."""
    from vlmeval.dataset import DATASET_TYPE

    from speedq_core.evaluate import speedq_vlm_class

    base = speedq_vlm_class()

    class SpeedqRunVLM(base):
        def _for(self, dataset: str | None) -> None:
            kind = DATASET_TYPE(dataset) if dataset else "VQA"
            self.kind = kind if kind in ("MCQ", "Y/N") else "VQA"

        def build_prompt(self, line, dataset=None):
            self._for(dataset)
            return super().build_prompt(line, dataset)

        def generate_inner(self, message, dataset=None):
            self._for(dataset)
            return super().generate_inner(message, dataset)

    adapter, model, processor = load_run(run_dir)
    return SpeedqRunVLM(adapter, model, processor, "MCQ", max_new_tokens=16)


def main(argv: list[str] | None = None) -> None:
    """Register the ``--model`` run directories, then run VLMEvalKit's CLI with their labels."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if "--model" not in argv:
        raise SystemExit("usage: python -m speedq_core.vlmeval_launcher --model RUN_DIR [RUN_DIR ...] <run.py args>")
    import vlmeval.config
    import vlmeval.run

    start = argv.index("--model") + 1
    end = start
    while end < len(argv) and not argv[end].startswith("--"):
        end += 1
    labels = []
    for run_dir in argv[start:end]:
        label = Path(run_dir).resolve().name
        vlmeval.config.supported_VLM[label] = functools.partial(checkpoint_vlm, run_dir)
        labels.append(label)
    sys.argv = ["run.py", *argv[:start], *labels, *argv[end:]]
    vlmeval.run.main()


if __name__ == "__main__":
    main()

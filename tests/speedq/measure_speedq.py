"""Measurements behind the SPEED-Q report (not a test): ``python tests/speedq/measure_speedq.py``.

1. A tiny InternVL is first fine-tuned in float on the disc-colour task (so the teacher knows
   something), then: stage 1 (w2g16g16 ViT AdaRound) block errors against RTN; stage 2 with and
   without distillation (held-out answer accuracy, CE and KL to the teacher); the stage-3 loss curve.
"""
from __future__ import annotations

import copy
import json
import shutil
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from helpers import context, samples, tiny  # noqa: E402

from speedq_core.training.loop import TrainConfig, train  # noqa: E402
from speedq_core.training.losses import answer_ce, kl_per_token  # noqa: E402
from speedq_plugins.speedq.data import Batches, training_set  # noqa: E402
from speedq_plugins.speedq.method import SpeedQProjector, SpeedQQAT, SpeedQViT  # noqa: E402
from speedq_plugins.speedq.objective import Objective  # noqa: E402


@torch.no_grad()
def evaluate(model, teacher, batch):
    logits, t_logits = model(**batch.model_kwargs()).logits, teacher(**batch.model_kwargs()).logits
    first = (batch.labels[:, 1:] != -100).float().argmax(1)  # first answer token (the colour word)
    rows = torch.arange(len(first))
    pred = logits[:, :-1][rows, first].argmax(-1)
    acc = (pred == batch.labels[:, 1:][rows, first]).float().mean().item()
    mask = torch.zeros_like(batch.labels, dtype=torch.bool)
    mask[:, :-1] = batch.labels[:, 1:] != -100
    kl = kl_per_token(t_logits, logits)[mask].mean().item()
    return {"acc": round(acc, 3), "ce": round(answer_ce(logits, batch.labels).item(), 4), "kl_to_teacher": round(kl, 4)}


def main() -> None:
    torch.set_num_threads(1)
    adapter, model, processor = tiny()
    train_data = samples(128)
    held_out = samples(64, offset=1000)
    batches = Batches(adapter, training_set(model, adapter, train_data, "measure"), 8, 0)
    train(model, batches, Objective("task", label_smoothing=0.0).loss_fn(None), TrainConfig(steps=400, lr=2e-3, warmup_steps=40))
    test = adapter.build_inputs(processor, [s[0] for s in held_out], [s[1] for s in held_out],
                                [s[2] for s in held_out])
    teacher = copy.deepcopy(model).eval()
    results = {"float": evaluate(model, teacher, test)}
    out = Path(tempfile.mkdtemp()) / "stages"
    opts = {"vit_samples": 32, "adaround_iters": 200, "adaround_batch": 8, "batch_size": 8, "gamma_steps": 10, "adaround_fallback": False,
            "projector_steps": 40, "qat_steps": 40, "clip_samples": 16}
    vit = copy.deepcopy(teacher)
    summary = SpeedQViT().quantize(vit, adapter, context(out, train_data, **opts))
    results["stage1_blocks"] = {k: {m: round(v, 6) for m, v in s.items()}
                                for k, s in summary["stages"]["stage1"]["blocks"].items()}
    results["after_stage1"] = evaluate(vit, teacher, test)
    for distill in (False, True):
        run = out.parent / f"distill-{distill}"
        shutil.copytree(out, run)
        student = copy.deepcopy(teacher)
        s2 = SpeedQProjector().quantize(student, adapter, context(run, train_data, stage2_distill=distill, **opts))
        results[f"stage2_distill={distill}"] = {**evaluate(student, teacher, test),
                                                "loss": [round(s2["stages"]["stage2"]["loss_first"], 4),
                                                         round(s2["stages"]["stage2"]["loss_last"], 4)]}
    student = copy.deepcopy(teacher)
    s3 = SpeedQQAT().quantize(student, adapter, context(out.parent / "distill-False", train_data, **opts))
    losses = s3["stages"]["stage3"]["losses"]
    results["stage3"] = {**evaluate(student, teacher, test), "gamma": round(s3["stages"]["stage3"]["gamma"], 4),
                         "loss_first5": [round(x, 3) for x in losses[:5]],
                         "loss_last5": [round(x, 3) for x in losses[-5:]]}
    print(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()

"""SPEED-Q's options: every key of ``ctx.options`` the method reads, with its default and meaning.

Defaults are the official code's (``speedq-official.md``) unless marked *deviation*.

==================== ============== ==========================================================================
key                  default        meaning
==================== ============== ==========================================================================
stages               "1,2,3"        stages ``speedq`` runs (``speedq-vit`` / ``-projector`` / ``-qat`` run 1 / 2 / 3).
                                    A stage not listed is loaded from ``stages/stageN`` when there, else skipped.
joint                false          Table 5 "joint quantization": no stage 1/2; ViT and LLM fake-quantized
                                    and trained together in one QAT (output ``stages/joint``).
loss                 "both"         stage-3 objective: ``both`` (KD + CE), ``task`` (CE), ``distill`` (KD); Table 5.
kd_weight            1.0            λ of eq. (7).
ce_weight            1.0            ζ of eq. (7).
label_smoothing      0.1            CE label smoothing (official code; not in the paper).
kd_normalize         "sequence_sum" KD summed over each sequence's answer tokens, mean over the batch
                                    (official) or ``token_mean`` (mean over answer tokens).
kd_mask_shifted      false          KD scored at the unshifted label positions (official) or, ``true``, at
                                    the logits that predict the answer tokens. The official mask distills the
                                    token *after* each answer token; on the shipped tiny-internvl at w2g16g16
                                    (float 90.6%, 4096 training samples) ``true`` gives 85.6% against 84.9%
                                    (at 1024 samples: 84.1% against 81.0%; distill-only 82.6% against
                                    71.7%), at 4 bits 91.0% against 90.0%.
gamma_steps          100            batches of the teacher-only γ pass (eq. 6) before training.
stage2_distill       false          add the KD term in stage 2 (official: task loss only).
quantize_projector   false          fake-quantize the projector in stage 3 (official: stays float); its scheme
                                    is ``ctx.schemes["projector"]`` if given, else the language one. Also on
                                    when ``projector`` is among the run's components.
train_embeddings     true           stage 3 trains embeddings and lm_head with the LLM (InternVL fine-tuning
                                    with ``freeze_llm=False`` trains the whole LLM; *assumed* for the official
                                    scripts). They are fake-quantized only when ``lm_head`` is a component.
batch_size           8              samples per step per rank (*deviation*: official global batch 64 =
                                    8 GPUs x 1 x gradient accumulation; set ``gradient_accumulation_steps`` in
                                    ``ds_config`` for that).
lr                   "auto"         AdamW lr, constant, weight decay 0 (official 8e-6). ``auto`` = 8e-6, or
                                    for models under 10M parameters (*deviation*) TINY_LR = 2e-5 at 4+ bits
                                    and TINY_LOW_BIT_LR = 3e-4 at 2-3 bits (the run's lowest bit width).
                                    Measured at w4g32g128 on a tiny-internvl at 84.3%: lr 1e-3 -> 70.1%,
                                    1e-4 -> 82.9%, 2e-5 -> 84.4% (near float, a big lr only retrains); at
                                    w2g16g16 on an intermediate planted-outlier one at 83.7%: 2e-5 -> 64.0%,
                                    1e-4 -> 76.0%, 3e-4 -> 76.7% (2 bits start far from float and must
                                    move). Untrained test models need ~1e-3 to move in a few steps and set it.
grad_clip            1.0            gradient-norm clip (the HF Trainer default the official code runs with).
projector_steps      "auto"         stage-2 steps; ``auto`` = one pass over ``projector_fraction`` of the samples.
projector_fraction   0.1            share of the training samples stage 2 sees (paper 10%; the script 1%).
qat_steps            "auto"         stage-3 steps; ``auto`` = one pass over the samples (``--calib-samples``,
                                    SPEED-Q's default 4096: 512 steps at batch 8).
vit_samples          128            images for stage 1 (image-only calibration; paper: 128).
adaround_iters       "auto"         AdaRound iterations per ViT block: ``auto`` = BRECQ's 20000, or
                                    TINY_ADAROUND_ITERS = 200 under TINY_PARAMS parameters (*deviation*).
adaround_batch       32             images per AdaRound batch (BRECQ's default).
adaround_lr          0.001          Adam lr on V (BRECQ).
adaround_lambda      0.01           λ of the rounding regulariser (BRECQ).
adaround_warmup      0.2            share of the iterations without the regulariser (BRECQ).
adaround_fallback    true           keep RTN codes for a block AdaRound made worse on the calibration data
                                    (*deviation*: BRECQ has no such check).
adaround_target      "fp"           block target from float inputs ``block_fp(x_fp)`` (BRECQ asym) or
                                    ``quant_input``: ``block_fp(x_q)``.
clip                 true           asymmetric clipping search before QAT.
clip_samples         128            training samples whose LLM-linear inputs the clipping search uses
                                    (*deviation*: official autoclip reads a text-only calibration set).
clip_grid            20             grid steps of the search (shrink i/clip_grid, i < clip_max_shrink*clip_grid).
clip_max_shrink      0.5            largest shrink of min and max.
clip_tokens          512            tokens per linear the search scores.
engine               "plain"        training loop: ``plain`` (single process) or ``deepspeed``.
ds_config            null           DeepSpeed JSON (path) merged over speedq's defaults.
checkpoint_every     0              training checkpoint every N steps (0 = none), under stages/stageN-ckpt.
resume               false          continue stage 2/3 training from its newest checkpoint.
==================== ============== ==========================================================================

Finished stages are always reused from ``stages/`` (the run directory is the unit of resumption);
a stage saved with other options, or a ``stages/`` made for another model or scheme, is refused with
the fix named.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from torch import nn

from speedq_core.errors import SpeedqError, suggest

OFFICIAL_LR = 8e-6
TINY_LR = 2e-5
TINY_LOW_BIT_LR = 3e-4  # tiny models at <= 3 bits
TINY_PARAMS = 10_000_000
BRECQ_ADAROUND_ITERS = 20000
TINY_ADAROUND_ITERS = 200
CHOICES = {
    "loss": ("both", "task", "distill"),
    "kd_normalize": ("sequence_sum", "token_mean"),
    "engine": ("plain", "deepspeed"),
    "adaround_target": ("fp", "quant_input"),
}
AUTO = "auto"


@dataclass(frozen=True)
class SpeedqOptions:
    stages: tuple[int, ...] = (1, 2, 3)
    joint: bool = False
    loss: str = "both"
    kd_weight: float = 1.0
    ce_weight: float = 1.0
    label_smoothing: float = 0.1
    kd_normalize: str = "sequence_sum"
    kd_mask_shifted: bool = False
    gamma_steps: int = 100
    stage2_distill: bool = False
    quantize_projector: bool = False
    train_embeddings: bool = True
    batch_size: int = 8
    lr: float | str = AUTO
    grad_clip: float = 1.0
    projector_steps: int | str = AUTO
    projector_fraction: float = 0.1
    qat_steps: int | str = AUTO
    vit_samples: int = 128
    adaround_iters: int | str = AUTO
    adaround_batch: int = 32
    adaround_lr: float = 1e-3
    adaround_lambda: float = 0.01
    adaround_warmup: float = 0.2
    adaround_fallback: bool = True
    adaround_target: str = "fp"
    clip: bool = True
    clip_samples: int = 128
    clip_grid: int = 20
    clip_max_shrink: float = 0.5
    clip_tokens: int = 512
    engine: str = "plain"
    ds_config: str | None = None
    checkpoint_every: int = 0
    resume: bool = False

    def to_json(self) -> dict[str, Any]:
        data = dataclasses.asdict(self)
        data["stages"] = list(self.stages)
        return data


def _parse_stages(value: Any) -> tuple[int, ...]:
    items = value.split(",") if isinstance(value, str) else list(value)
    try:
        stages = tuple(sorted({int(str(s).strip()) for s in items if str(s).strip()}))
    except ValueError:
        stages = ()
    if not stages or any(s not in (1, 2, 3) for s in stages):
        raise SpeedqError(f"stages={value!r} is invalid: give a comma list of 1, 2, 3 such as \"1,2,3\"")
    return stages


def _coerce(key: str, value: Any, default: Any) -> Any:
    """``value`` (possibly a CLI string) converted to the type of ``default``."""
    if key == "stages":
        return _parse_stages(value)
    if default == AUTO and (value == AUTO or value is None):
        return AUTO
    if key == "ds_config":
        return None if value in (None, "", "null") else str(value)
    kind = type(default) if default != AUTO else (float if key == "lr" else int)
    try:
        if kind is bool:
            if isinstance(value, str):
                if value.lower() not in ("1", "0", "true", "false", "yes", "no", "on", "off"):
                    raise ValueError(value)
                return value.lower() in ("1", "true", "yes", "on")
            return bool(value)
        if kind is int and isinstance(value, float) and not value.is_integer():
            raise ValueError(value)
        return kind(value) if kind is not int else int(float(value))
    except (TypeError, ValueError):
        raise SpeedqError(f"option {key}={value!r} is not a valid {kind.__name__}: default is {default!r}") from None


def parse_options(options: dict[str, Any], forced_stages: tuple[int, ...] | None = None) -> SpeedqOptions:
    """``ctx.options`` -> SpeedqOptions; unknown keys and bad values raise SpeedqError naming the fix."""
    fields = {f.name: f.default for f in dataclasses.fields(SpeedqOptions)}
    values = {}
    for key, value in (options or {}).items():
        if key not in fields:
            raise SpeedqError(f"unknown SPEED-Q option {key!r}{suggest(key, fields)}: see "
                              "speedq_plugins.speedq.options for the keys")
        values[key] = _coerce(key, value, fields[key])
        if key in CHOICES and values[key] not in CHOICES[key]:
            raise SpeedqError(f"option {key}={value!r} is unknown: use one of {', '.join(CHOICES[key])}")
    if forced_stages is not None:
        if "stages" in values and values["stages"] != forced_stages:
            raise SpeedqError(f"this method runs stage {forced_stages[0]} only: drop the stages option or use "
                              "--method speedq")
        values["stages"] = forced_stages
    opts = SpeedqOptions(**values)
    for key in ("batch_size", "gamma_steps", "vit_samples", "adaround_batch", "clip_samples", "clip_tokens"):
        if getattr(opts, key) < 1:
            raise SpeedqError(f"option {key} must be at least 1, got {getattr(opts, key)}")
    return opts


def _is_tiny(model: nn.Module) -> bool:
    return sum(p.numel() for p in model.parameters()) < TINY_PARAMS


def resolve_lr(opts: SpeedqOptions, model: nn.Module, bits: int = 4) -> float:
    """``lr``, with ``auto`` = the official 8e-6, or for a model under TINY_PARAMS parameters TINY_LR
    (``bits`` >= 4) / TINY_LOW_BIT_LR (``bits`` <= 3)."""
    if opts.lr != AUTO:
        return float(opts.lr)
    if not _is_tiny(model):
        return OFFICIAL_LR
    return TINY_LR if bits >= 4 else TINY_LOW_BIT_LR


def resolve_adaround_iters(opts: SpeedqOptions, model: nn.Module) -> int:
    """``adaround_iters``, with ``auto`` = BRECQ's 20000, or TINY_ADAROUND_ITERS for a tiny model."""
    if opts.adaround_iters != AUTO:
        return int(opts.adaround_iters)
    return TINY_ADAROUND_ITERS if _is_tiny(model) else BRECQ_ADAROUND_ITERS

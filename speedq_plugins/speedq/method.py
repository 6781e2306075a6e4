"""The SPEED-Q methods: ``speedq`` (all stages) and each stage alone.

    speedq            stage 1 (ViT AdaRound) -> stage 2 (projector) -> stage 3 (LLM QAT + KD)
    speedq-vit        stage 1 only
    speedq-projector  stage 2 only, from stages/stage1
    speedq-qat        stage 3 only, from stages/stage1 and stages/stage2

Each stage writes its result under ``ctx.out_dir`` (the run's ``stages/``), atomically, through
:func:`speedq_core.export.save_quantized`::

    stages/options.json   the resolved options, the model fingerprint and the schemes
    stages/stage1/        the vision component (its linears as packed QuantLinear)
    stages/stage2/        the projector
    stages/stage3/        the whole model after QAT (LLM linears as QuantLinear)
    stages/joint/         the whole model after the joint-QAT ablation

Each stage's ``quant_config.json`` carries, under ``speedq``, the options that shaped it and the
ids (manifest hashes) of the stages it started from. A finished stage is reused, never redone; one
made with other options or from other parents is refused with the fix named. The teacher for
distillation is a frozen copy of the float model taken before anything is quantized.
Options: :mod:`speedq_plugins.speedq.options`.
"""
from __future__ import annotations

import copy
import hashlib
import json
from pathlib import Path
from typing import Any, ClassVar

from torch import nn

from speedq_core.adapter import FamilyAdapter
from speedq_core.calibration import CalibrationSet
from speedq_core.errors import SpeedqError
from speedq_core.export import load_quantized, read_quant_config, save_quantized
from speedq_core.method import Method, QuantContext
from speedq_core.quant import FakeQuantLinear, QuantLinear, QuantScheme
from speedq_core.runner import write_json_atomic
from speedq_core.training.loop import TrainConfig, clear_checkpoints
from speedq_plugins.speedq.adaround import AdaRoundConfig, quantize_vision
from speedq_plugins.speedq.data import Batches, training_set
from speedq_plugins.speedq.objective import Objective, estimate_gamma
from speedq_plugins.speedq.options import AUTO, SpeedqOptions, parse_options, resolve_adaround_iters, resolve_lr
from speedq_plugins.speedq.projector import component_parameters, train_projector
from speedq_plugins.speedq.qat import fake_quantize, run_qat, search_clipping

OPTIONS_FILE = "options.json"
# Options that shape each stage's output (a saved stage is reused only if they match).
STAGE_KEYS = {
    "stage1": ("vit_samples", "adaround_iters", "adaround_batch", "adaround_lr", "adaround_lambda",
               "adaround_warmup", "adaround_fallback", "adaround_target"),
    "stage2": ("batch_size", "lr", "grad_clip", "projector_steps", "projector_fraction", "label_smoothing",
               "stage2_distill", "gamma_steps", "kd_weight", "kd_normalize", "kd_mask_shifted"),
    "stage3": ("batch_size", "lr", "grad_clip", "qat_steps", "loss", "kd_weight", "ce_weight", "label_smoothing",
               "kd_normalize", "kd_mask_shifted", "gamma_steps", "quantize_projector", "train_embeddings", "clip",
               "clip_samples", "clip_grid", "clip_max_shrink", "clip_tokens"),
}
STAGE_KEYS["joint"] = STAGE_KEYS["stage3"]
PARENTS = {"stage1": (), "stage2": ("stage1",), "stage3": ("stage1", "stage2"), "joint": ()}


def model_fingerprint(model: nn.Module) -> dict[str, str]:
    """Architecture (names, shapes, dtypes) and weights (a strided sample of every tensor) hashes."""
    arch, weights = hashlib.sha256(), hashlib.sha256()
    for name, tensor in model.state_dict().items():
        arch.update(f"{name}:{tuple(tensor.shape)}:{tensor.dtype};".encode())
        flat = tensor.detach().reshape(-1)
        sample = flat[:: max(1, flat.numel() // 64)][:64].float().cpu()
        weights.update(sample.numpy().tobytes())
    return {"model_type": str(getattr(getattr(model, "config", None), "model_type", type(model).__name__)),
            "architecture": arch.hexdigest()[:16], "weights": weights.hexdigest()[:16]}


def stage_id(stage_dir: Path) -> str:
    return hashlib.sha256((stage_dir / "manifest.json").read_bytes()).hexdigest()[:16]


class SpeedqRun:
    """One call of a SPEED-Q method: plans the stages, then runs or reuses each in order."""

    def __init__(self, method: SpeedQ, model: nn.Module, adapter: FamilyAdapter, ctx: QuantContext):
        self.method, self.model, self.adapter, self.ctx = method, model, adapter, ctx
        self.opts: SpeedqOptions = parse_options(ctx.options, method.forced_stages)
        self.out = Path(ctx.out_dir)
        self.schemes = dict(ctx.schemes)
        self.lr = resolve_lr(self.opts, model, min(s.bits for s in self.schemes.values()) if self.schemes else 4)
        self.fingerprint = model_fingerprint(model)
        self._data: CalibrationSet | None = None
        self._batches: Batches | None = None
        self._gamma: float | None = None
        self.teacher: nn.Module | None = None
        self.resolved: dict[str, Any] = {}

    # -- bookkeeping ---------------------------------------------------------------------------
    def log(self, message: str) -> None:
        self.ctx.log(f"{self.method.name}: {message}")

    def check_run_dir(self) -> None:
        """Refuse a stages/ directory made for another model or scheme; write options.json."""
        path = self.out / OPTIONS_FILE
        schemes = {part: scheme.name for part, scheme in self.schemes.items()}
        if path.exists():
            have = json.loads(path.read_text())
            for key, what in (("fingerprint", "model"), ("schemes", "scheme")):
                if have.get(key) != (self.fingerprint if key == "fingerprint" else schemes):
                    raise SpeedqError(
                        f"{self.out} holds SPEED-Q stages made for a different {what} ({have.get(key)}): "
                        f"pass another run directory (--out) or delete {self.out}"
                    )
        write_json_atomic(path, {"method": self.method.name, "fingerprint": self.fingerprint, "schemes": schemes,
                                 "options": {**self.opts.to_json(), **self.resolved}})

    def stage_meta(self, stage: str) -> dict[str, Any]:
        resolved = {**self.opts.to_json(), "lr": self.lr}  # step counts as given ("auto" stays "auto")
        return {"stage": stage, "fingerprint": self.fingerprint,
                "schemes": {p: s.name for p, s in self.schemes.items()},
                "options": {key: resolved[key] for key in STAGE_KEYS[stage]} | {"seed": self.ctx.seed},
                "parents": {p: stage_id(self.out / p) if self.done(p) else None for p in PARENTS[stage]}}

    def done(self, stage: str) -> bool:
        return (self.out / stage / "quant_config.json").is_file()

    def check_saved(self, stage: str) -> None:
        """Refuse to reuse ``stages/<stage>`` when it was made from other parents or, for a stage this
        run was asked to run, with other options (a stage only read as input may differ in those)."""
        directory = self.out / stage
        have = read_quant_config(directory).get("speedq", {})
        want = self.stage_meta(stage)
        asked = self.opts.joint or int(stage[-1]) in self.opts.stages
        for section in ("options", "parents") if asked else ("parents",):
            diff = sorted(k for k in set(have.get(section, {})) | set(want[section])
                          if have.get(section, {}).get(k) != want[section].get(k))
            if diff:
                key = diff[0]
                raise SpeedqError(
                    f"{directory} was made with {section[:-1]} {key}={have.get(section, {}).get(key)!r} but this run "
                    f"has {want[section].get(key)!r}: delete {directory} (and the stages after it) to redo it, "
                    f"or rerun with the options in {self.out / OPTIONS_FILE}"
                )

    def save(self, stage: str, module: nn.Module, summary: dict[str, Any]) -> None:
        save_quantized(module, self.out / stage, {"speedq": {**self.stage_meta(stage), "summary": summary}})

    def load(self, stage: str, module: nn.Module) -> dict[str, Any]:
        self.check_saved(stage)
        load_quantized(module, self.out / stage)
        self.log(f"reusing {self.out / stage}")
        return {"reused": str(self.out / stage)}

    # -- data ----------------------------------------------------------------------------------
    def data(self) -> CalibrationSet:
        if self._data is None:
            self._data = training_set(self.model, self.adapter, self.ctx.calibration, self.method.name)
        return self._data

    def batches(self) -> Batches:
        if self._batches is None:
            self._batches = Batches(self.adapter, self.data(), self.opts.batch_size, self.ctx.seed, self.ctx.device,
                                    self.method.name)
        return self._batches

    def subset(self, n: int, component: str, batch_size: int) -> list:
        data = self.data()
        head = CalibrationSet(data.samples[:n], data.source, data.processor)
        return [b.to(self.ctx.device) for b in head.model_inputs(self.adapter, component, batch_size=batch_size)]

    def gamma(self) -> float:
        if self._gamma is None:
            self._gamma = estimate_gamma(self.teacher, self.batches(), self.opts.gamma_steps)
            self.log(f"γ = {self._gamma:.4f} (teacher, first {self.opts.gamma_steps} batches)")
        return self._gamma

    def objective(self, loss: str) -> Objective:
        o = self.opts
        gamma = self.gamma() if loss != "task" else None
        return Objective(loss, gamma, o.kd_weight, o.ce_weight, o.label_smoothing, o.kd_normalize, o.kd_mask_shifted)

    def train_config(self, stage: str, steps: int) -> TrainConfig:
        ckpt = self.out / f"{stage}-ckpt"
        return TrainConfig(steps=steps, lr=self.lr, weight_decay=0.0, grad_clip=self.opts.grad_clip or None,
                           seed=self.ctx.seed, checkpoint_dir=str(ckpt) if self.opts.checkpoint_every else None,
                           checkpoint_every=self.opts.checkpoint_every, resume=self.opts.resume)

    def steps(self, value: int | str, fraction: float) -> int:
        return self.batches().steps_per_epoch(fraction) if value == AUTO else int(value)

    # -- plan ----------------------------------------------------------------------------------
    def plan(self) -> list[tuple[str, str]]:
        """``[(stage, "run" | "load")]`` in order; stages neither run nor loaded are logged and left out."""
        if self.opts.joint:
            missing = [part for part in ("vision", "language") if part not in self.schemes]
            if missing:
                raise SpeedqError(f"joint=true quantizes the ViT and the LLM together, but {missing[0]} is not "
                                  "among the run's components: add it (--components vision,language)")
            return [("joint", "load" if self.done("joint") else "run")]
        wanted = self.opts.stages
        last = max(wanted)
        if last == 3 and self.done("stage3"):
            return [("stage3", "load")]
        steps = []
        for k in range(1, last + 1):
            stage = f"stage{k}"
            if k == 1 and "vision" not in self.schemes:
                self.log("stage 1 skipped: vision is not among the quantized components")
            elif k == 3 and "language" not in self.schemes:
                self.log("stage 3 skipped: language is not among the quantized components")
            elif self.done(stage):
                steps.append((stage, "load"))
            elif k in wanted:
                steps.append((stage, "run"))
            elif k in self.method.requires:
                raise SpeedqError(
                    f"{self.method.name} starts from stage {k}'s output, but {self.out / stage} does not exist: "
                    f"run {STAGE_METHOD[k]} first with the same run directory, or --method speedq"
                )
            else:
                self.log(f"stage {k} skipped: not in stages={','.join(map(str, wanted))} and no {self.out / stage}")
        return steps

    def needs_teacher(self, steps: list[tuple[str, str]]) -> bool:
        running = {stage for stage, action in steps if action == "run"}
        return bool(("stage2" in running and self.opts.stage2_distill)
                    or (running & {"stage3", "joint"} and self.opts.loss != "task"))

    # -- stages --------------------------------------------------------------------------------
    def component(self, part: str) -> nn.Module:
        return self.model.get_submodule(self.adapter.component_paths[part])

    def stage1(self) -> dict[str, Any]:
        o = self.opts
        cfg = AdaRoundConfig(resolve_adaround_iters(o, self.model), o.adaround_lr, o.adaround_lambda,
                             o.adaround_warmup, target=o.adaround_target, seed=self.ctx.seed,
                             fallback=o.adaround_fallback)
        batches = self.subset(o.vit_samples, "vision", o.adaround_batch)
        summary = quantize_vision(self.model, self.adapter, self.schemes["vision"], batches, cfg, self.log)
        self.save("stage1", self.component("vision"), summary)
        return summary

    def stage2(self) -> dict[str, Any]:
        steps = self.steps(self.opts.projector_steps, self.opts.projector_fraction)
        self.resolved["projector_steps"] = steps
        loss = "both" if self.opts.stage2_distill else "task"
        objective = self.objective(loss)
        summary = train_projector(self.model, self.adapter, self.batches(), objective.loss_fn(self.teacher),
                                  self.train_config("stage2", steps), self.opts.engine, self.opts.ds_config)
        summary.update(loss=loss, gamma=objective.gamma)
        self.log(f"stage 2: {steps} steps, loss {summary['loss_first']:.4f} -> {summary['loss_last']:.4f}")
        self.save("stage2", self.component("projector"), summary)
        clear_checkpoints(self.out / "stage2-ckpt")
        return summary

    def qat_targets(self, joint: bool) -> dict[str, QuantScheme]:
        language = self.schemes["language"]
        parts = {"language": language}
        if joint:
            parts["vision"] = self.schemes["vision"]
        if self.opts.quantize_projector or "projector" in self.schemes:
            parts["projector"] = self.schemes.get("projector", language)
        if "lm_head" in self.schemes:
            parts["lm_head"] = self.schemes["lm_head"]
        return {name: scheme for part, scheme in parts.items() for name in self.adapter.linears(self.model, part)}

    def stage3(self, joint: bool = False) -> dict[str, Any]:
        o = self.opts
        stage = "joint" if joint else "stage3"
        steps = self.steps(o.qat_steps, 1.0)
        self.resolved["qat_steps"] = steps
        objective = self.objective(o.loss)
        targets = self.qat_targets(joint)
        bounds = {}
        if o.clip:
            clip_batches = self.subset(o.clip_samples, "language", o.batch_size)
            bounds = search_clipping(self.model, self.adapter, targets, clip_batches, o.clip_grid,
                                     o.clip_max_shrink, o.clip_tokens)
            self.log(f"clipping searched for {len(bounds)} linears")
        fake_quantize(self.model, targets, bounds)
        parts = ("projector", "language") + (("embeddings", "lm_head") if o.train_embeddings else ())
        parts += ("vision",) if joint else ()
        params = component_parameters(self.model, self.adapter, parts)
        summary = run_qat(self.model, targets, params, self.batches(), objective.loss_fn(self.teacher),
                          self.train_config(stage, steps), o.engine, o.ds_config)
        summary.update(loss=o.loss, gamma=objective.gamma, trained_parts=list(parts),
                       trained_parameters=sum(p.numel() for p in params))
        self.log(f"{stage}: {steps} steps, loss {summary['loss_first']:.4f} -> {summary['loss_last']:.4f}")
        self.save(stage, self.model, summary)
        clear_checkpoints(self.out / f"{stage}-ckpt")
        return summary

    # -- entry ---------------------------------------------------------------------------------
    def execute(self) -> dict[str, Any]:
        quantized = [n for n, m in self.model.named_modules() if isinstance(m, (QuantLinear, FakeQuantLinear))]
        if quantized:
            raise SpeedqError(f"{self.method.name} starts from the float model, but {quantized[0]} is already "
                              "quantized: load the float checkpoint (earlier stages are read from stages/)")
        if self.opts.engine == "deepspeed" and self.opts.ds_config and not Path(self.opts.ds_config).is_file():
            raise SpeedqError(f"ds_config {self.opts.ds_config} does not exist: pass a DeepSpeed JSON file")
        self.resolved["lr"] = self.lr
        self.check_run_dir()
        steps = self.plan()
        if self.needs_teacher(steps):
            self.teacher = copy.deepcopy(self.model).eval().requires_grad_(False)
        modules = {"stage1": lambda: self.component("vision"), "stage2": lambda: self.component("projector")}
        summary: dict[str, Any] = {"stages": {}}
        for stage, action in steps:
            if action == "load":
                summary["stages"][stage] = self.load(stage, modules.get(stage, lambda: self.model)())
            elif stage == "stage1":
                summary["stages"][stage] = self.stage1()
            elif stage == "stage2":
                summary["stages"][stage] = self.stage2()
            else:
                summary["stages"][stage] = self.stage3(joint=stage == "joint")
        self.check_run_dir()  # now with the resolved step counts
        summary["options"] = {**self.opts.to_json(), **self.resolved}
        self.teacher = None
        return summary


STAGE_METHOD = {1: "speedq-vit", 2: "speedq-projector", 3: "speedq-qat"}


class SpeedQ(Method):
    name = "speedq"
    description = "SPEED-Q: ViT AdaRound, projector warm-up, LLM QAT with self-distillation (staged)"
    default_schemes = {4: "w4g32g128", 2: "w2g16g16"}
    default_components = ("vision", "language")
    needs_calibration = True
    # training data for stages 2 and 3 (the paper trains on 680K samples). On tiny-internvl at
    # w2g16g16 (one thread, seeds 42/1/2): 1024 -> 82.4/84.3/81.6, 4096 -> 85.6/83.1/84.1
    calibration_samples = 4096
    # Table 5's loss and joint-quantization rows, plus KD scored at the logits that predict the
    # answer (the official code scores it one position late: ``kd_mask_shifted``)
    ablation_defaults = {"loss": "both", "joint": False, "kd_mask_shifted": False}
    ablation_variants = ({"loss": "task"}, {"loss": "distill"}, {"joint": True}, {"kd_mask_shifted": True})
    forced_stages: ClassVar[tuple[int, ...] | None] = None
    requires: ClassVar[tuple[int, ...]] = ()

    def quantize(self, model: nn.Module, adapter: FamilyAdapter, ctx: QuantContext) -> dict[str, Any]:
        return SpeedqRun(self, model, adapter, ctx).execute()


class SpeedQViT(SpeedQ):
    name = "speedq-vit"
    description = "SPEED-Q stage 1: block-wise AdaRound of the vision encoder"
    forced_stages = (1,)


class SpeedQProjector(SpeedQ):
    name = "speedq-projector"
    description = "SPEED-Q stage 2: projector training on the quantized ViT (from stages/stage1)"
    forced_stages = (2,)
    requires = (1,)


class SpeedQQAT(SpeedQ):
    name = "speedq-qat"
    description = "SPEED-Q stage 3: LLM QAT with self-distillation (from stages/stage1 and stage2)"
    forced_stages = (3,)
    requires = (1, 2)

"""Training: losses (task CE, distillation) and loops (single process here, DeepSpeed for scale)."""

"""Training: the parts' configs, phases (trainable globs), the Lightning module and its optimizers, EMA, callbacks,
atomic checkpoints and resume discovery, preemption and fault injection, wandb, and the run's construction."""

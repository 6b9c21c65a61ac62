"""Training: config schema, phases, the Lightning module, callbacks, checkpoints, run construction."""

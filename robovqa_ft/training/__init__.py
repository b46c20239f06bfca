"""The training stages: the launcher, one run on the HF Trainer and its components
(callbacks, step order, collation, loss, model, checkpoints, memory guard, curves)."""

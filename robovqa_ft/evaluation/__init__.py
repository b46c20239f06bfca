"""Evaluation: eval.json of a run (losses, answers, scores, controls) and the ablation
report across runs, with their intervals."""

"""What people run around the workflow: ask a trained run, the runs' status, the merged
model and its card, the README's demo figures."""

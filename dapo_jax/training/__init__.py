"""The DAPO training loop and its stages: batching, policy update, checkpoints, reports, preemption."""

"""The training recipe: assembly, the step, loss, optimizer, checkpoints, resume, stopping."""

"""Inference jobs (score, embed, generate): the job on every rank (job), rank 0's files (files), what the
head computes per task (tasks) and the generation driver (generate)."""

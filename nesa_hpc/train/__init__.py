"""Split fine-tuning: the job (job), its options and data (options), one optimizer step over the pipeline
(step) and checkpoints and export (checkpoint)."""

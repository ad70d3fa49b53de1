"""nesa_hpc: batch split inference for transformer language models on MPI/HPC clusters."""

import os

# Nothing is ever fetched from a model hub: set before transformers / huggingface_hub read them.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

__version__ = "0.1.0"

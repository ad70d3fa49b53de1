"""nesa_hpc: batch split inference for transformer language models on MPI/HPC clusters."""

__version__ = "0.1.0"

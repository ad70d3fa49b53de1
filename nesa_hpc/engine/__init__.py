"""The pipeline itself: who runs which layers (topology, placement), what crosses the wire (transport), a
worker's stage and loop (stage), rank 0's two ends (owner), and the life of an MPI job (job, stop signals)."""

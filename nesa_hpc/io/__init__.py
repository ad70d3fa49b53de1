"""Rows in and results out: reading and batching input rows (data, inputs), public text, the HDF5 results
file (results), exporting it to other tools' formats (export), merging shards (merge)."""

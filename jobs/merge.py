"""Merge the result files of a sharded job into one file, rows in global input order.

    python jobs/merge.py -o out.h5 out.shard0.h5 out.shard1.h5 ...
    python jobs/merge.py -o out.h5 'out.shard*.h5'        # a quoted glob is expanded here

Checks that the files are complete shards of one job (same settings, each shard once, every input row
exactly once, in `row` or `skipped_row`) and exits with status 2 and a message naming the file otherwise.
"""

import argparse
import glob
import sys

from nesa_hpc.io.merge import MergeError, merge_shards
from nesa_hpc.io.results import OutputExistsError


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("shards", nargs="+", help="shard result files (data.num_shards > 1), any order")
    parser.add_argument("-o", "--output", required=True, help="merged HDF5 file to write")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing output file")
    args = parser.parse_args(argv)
    paths = []
    for pattern in args.shards:
        found = sorted(glob.glob(pattern)) if glob.has_magic(pattern) else [pattern]
        if not found:
            print(f"merge: error: no file matches {pattern}", file=sys.stderr)
            return 2
        paths += found
    try:
        done = merge_shards(paths, args.output, args.overwrite)
    except (MergeError, OutputExistsError, FileNotFoundError, PermissionError) as exc:
        print(f"merge: error: {exc}", file=sys.stderr)
        return 2
    print(f"merged {done['shards']} shards: {done['rows']} rows, {done['skipped']} skipped -> {done['output']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Export a results file: an OpenAI-batch-style output JSONL, or a JSONL, CSV or Parquet table.

    python jobs/export.py results.h5 -o answers.jsonl --format openai_batch   # custom_id, response.body ...
    python jobs/export.py results.h5 -o answers.jsonl --errors errors.jsonl   # OpenAI's output + error files
    python jobs/export.py results.h5 -o table.parquet                         # format from the extension
    python jobs/export.py results.h5 -o table.csv --columns nll_mean,n_tokens

Rows come out in input order, streamed (bounded memory). The output appears only once complete. Exits
with status 2 and a message naming the file or option when it cannot export.
"""

import argparse
import sys

from nesa_hpc.io.export import EXPORT_FORMATS, ExportError, export


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("results", help="an HDF5 results file of jobs/infer.py")
    parser.add_argument("-o", "--output", required=True, help="file to write")
    parser.add_argument("--format", choices=EXPORT_FORMATS, default=None,
                        help="openai_batch (task=generate files), jsonl, csv or parquet; default: from the "
                             "output's extension (.jsonl, .csv, .parquet)")
    parser.add_argument("--columns", default=None,
                        help="comma-separated per-row datasets for a table (default: all; `row` always first)")
    parser.add_argument("--errors", default=None,
                        help="openai_batch: write the lines of refused requests to this file instead (OpenAI's "
                             "error file); the output then holds the answered ones")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing output file")
    parser.add_argument("--allow-incomplete", action="store_true",
                        help="export the rows committed so far of a file whose job has not completed")
    args = parser.parse_args(argv)
    columns = [c.strip() for c in args.columns.split(",") if c.strip()] if args.columns else None
    try:
        done = export(args.results, args.output, args.format, columns, args.overwrite, args.allow_incomplete,
                      args.errors)
    except ExportError as exc:
        print(f"export: error: {exc}", file=sys.stderr)
        return 2
    unit = "lines" if done["format"] == "openai_batch" else "rows"
    errors = f", {done['errors']} error lines -> {args.errors}" if args.errors else ""
    print(f"exported {done['rows']} {unit} ({done['format']}) -> {done['output']}{errors}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

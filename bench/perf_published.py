"""The performance model against published large runs (apt/trainops/perf/published_runs.yaml).

    python bench/perf_published.py            # the table: source, inputs, published, predicted, error
    python bench/perf_published.py --rehash   # print each row's hash (after a sourced edit)

Nothing here adjusts the hardware constants (hardware.yaml) to the rows.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from apt.trainops.perf.published import (compare, load_runs, row_hash, table,  # noqa: E402
                                         verify_hashes)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rehash", action="store_true")
    args = parser.parse_args()
    rows = load_runs()
    if args.rehash:
        for r in rows:
            print(f"{r['id']}: {row_hash(r)}")
        return 0
    bad = verify_hashes(rows)
    if bad:
        print(f"rows edited without their hash: {', '.join(bad)}", file=sys.stderr)
        return 2
    print(table([compare(r) for r in rows]))
    return 0


if __name__ == "__main__":
    sys.exit(main())

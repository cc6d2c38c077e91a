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

from apt.trainops.perf.goodput import goodput  # noqa: E402
from apt.trainops.perf.published import (compare, load_runs, row_hash, table,  # noqa: E402
                                         verify_hashes)
from apt.trainops.perf.shape import ModelShape  # noqa: E402

# Llama 3 405B's reported effective training time over its 54-day snapshot (section 3.3.4).
LLAMA3_GOODPUT = "higher than 90% effective training time (Llama 3 paper, section 3.3.4)"


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
    comparisons = [compare(r) for r in rows]
    print(table(comparisons))
    # Goodput at the largest published scale: the 16,384-GPU Llama 3 row, its checkpoint at
    # 14 bytes per parameter (bf16 weights + fp32 master + two Adam moments, as Plan's
    # checkpoint_bytes), 15.6T tokens at the predicted rate, default failures and storage.
    c = next(c for c in comparisons if c.row["id"] == "llama3-405b-16k-gpus")
    shape = ModelShape(**c.row["model"])
    train_s = 15.6e12 / (c.prediction.tokens_per_s_per_gpu * c.row["gpus"])
    g = goodput(gpus=c.row["gpus"], checkpoint_bytes=14 * shape.total_params, train_s=train_s)
    print(f"\ngoodput at {c.row['gpus']:,} GPUs ({shape.total_params / 1e9:.0f}B parameters, "
          f"15.6T tokens):\n{g.describe()}\npublished: {LLAMA3_GOODPUT}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""The command line the layout workers share (eval_worker.py, megatron_canary.py): a TP x PP
layout, initial weights to save (the one-process reference) or load (every other layout), and
where rank 0 writes its JSON result."""
import argparse


def layout_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser()
    parser.add_argument("--tp", type=int, default=1)
    parser.add_argument("--pp", type=int, default=1)
    parser.add_argument("--save", help="write the initial weights here (dist_checkpointing)")
    parser.add_argument("--load", help="reshard these initial weights onto this layout")
    parser.add_argument("--out", required=True)
    return parser

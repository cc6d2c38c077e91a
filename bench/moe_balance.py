"""MoE load balancing, measured: how evenly a tiny MoE's experts are used under each balancing
option, and the MoE against a dense model with the same active parameters.

One process, CPU, the moe-tiny model shrunk to run in minutes (8 experts, top-2). Runs, all on
the same tokens from the same seed:
  aux        aux_loss 1e-2 (+ z-loss 1e-3), from a skewed router start
  none       no balancing, the same skewed start
  bias       aux-loss-free: sigmoid scores + expert bias (no aux loss), the same skewed start
  aux_fair   aux_loss 1e-2 from the ordinary initialisation
  dense      one MLP of width top_k x expert width (the MoE's active parameters)
The skewed start multiplies the router rows of experts 0 and 1 by ``--skew``: their logits
spread wider, so they win the top-2 far more often than the others.

Prints, per run, the worst layer's max violation (max load / mean load - 1) and the dead
experts over the first and the last log interval, and the validation loss; copies each run's
plots/expert_load.png to ``--out``.

    python bench/moe_balance.py [--steps 800 --skew 8 --out /tmp/apt-moe-balance]
"""
from __future__ import annotations

import argparse
import shutil
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from apt.core.logging import configure_logging  # noqa: E402

configure_logging()

from apt.core.config import load_profile  # noqa: E402
from apt.model.moe_routing import routers  # noqa: E402
from apt.trainops.trainers import trainer_for  # noqa: E402

SHAPE = ["model.hidden_size=64", "model.num_layers=2", "model.num_attention_heads=4",
         "model.num_query_groups=2", "model.max_seq_len=64", "data.seq_length=64",
         "data.max_corpus_bytes=2000000", "training.batch_size=16", "training.warmup_steps=20",
         "training.eval_batches=16", "output.sample_tokens=0", "monitoring.plots=true"]
EXPERT_FFN = 96
RUNS = {
    "aux": (True, ["model.moe_load_balancing=aux_loss", "model.moe_aux_loss_coeff=1e-2",
                   "model.moe_z_loss_coeff=1e-3"]),
    "none": (True, ["model.moe_load_balancing=none", "model.moe_z_loss_coeff=0"]),
    "bias": (True, ["model.moe_load_balancing=none", "model.moe_z_loss_coeff=0",
                    "model.moe_score_function=sigmoid", "model.moe_expert_bias=true",
                    "model.moe_bias_update_rate=1e-2"]),
    "aux_fair": (False, ["model.moe_load_balancing=aux_loss", "model.moe_aux_loss_coeff=1e-2",
                         "model.moe_z_loss_coeff=1e-3"]),
}


def run(name: str, overrides: list[str], skew: float, out: Path) -> dict:
    cfg = load_profile("moe-tiny", overrides + [f"output.dir={out / 'runs'}",
                                                f"output.experiment_name={name}"])
    trainer = trainer_for(cfg).from_config(cfg)
    if skew != 1.0:
        for router in routers(trainer.modules):
            router.weight.data[:2] *= skew
    summary = trainer.train()
    logged = [r for r in trainer.history if "moe/max_violation" in r]
    result = {"val_loss": summary["val_loss"], "steps": trainer.step,
              "params_total": trainer.plan.params_total,
              "params_active": trainer.plan.params_active}
    if logged:
        first, last = logged[0], logged[-1]
        result.update(first_violation=first["moe/max_violation"],
                      last_violation=last["moe/max_violation"],
                      first_dead=first["moe/dead_experts"], last_dead=last["moe/dead_experts"],
                      last_entropy=last["moe/router_entropy"],
                      last_bias_norm=last["moe/expert_bias_norm"],
                      trajectory=[round(r["moe/max_violation"], 3) for r in logged])
        png = Path(trainer.artifacts.run_dir) / "plots" / "expert_load.png"
        shutil.copy(png, out / f"expert_load_{name}.png")
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=800)
    parser.add_argument("--skew", type=float, default=8.0)
    parser.add_argument("--log-interval", type=int, default=25)
    parser.add_argument("--only", nargs="*", default=None, help="run only these")
    parser.add_argument("--out", default="/tmp/apt-moe-balance")
    args = parser.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    common = SHAPE + [f"training.max_steps={args.steps}",
                      f"training.log_interval={args.log_interval}",
                      f"training.eval_interval={args.steps}"]
    results = {}
    for name, (skewed, extra) in RUNS.items():
        if args.only is None or name in args.only:
            results[name] = run(name, common + [f"model.ffn_hidden_size={EXPERT_FFN}"] + extra,
                                args.skew if skewed else 1.0, out)
    if args.only is None or "dense" in args.only:
        k = load_profile("moe-tiny").model.moe_top_k
        results["dense"] = run("dense", common + ["model.num_experts=null",
                                                  f"model.ffn_hidden_size={k * EXPERT_FFN}"],
                               1.0, out)
    print(f"\n{'run':9s} {'params total/active':>20s} {'val loss':>9s} "
          f"{'max violation first -> last':>28s} {'dead first -> last':>18s}")
    for name, r in results.items():
        params = f"{r['params_total'] / 1e3:.0f}K/{r['params_active'] / 1e3:.0f}K"
        line = f"{name:9s} {params:>20s} {r['val_loss']:9.4f}"
        if "last_violation" in r:
            line += (f" {r['first_violation']:13.3f} -> {r['last_violation']:<10.3f}"
                     f" {r['first_dead']:8d} -> {r['last_dead']:<5d}"
                     f" entropy {r['last_entropy']:.3f} bias norm {r['last_bias_norm']:.3f}")
        print(line)
        if "trajectory" in r:
            print(f"{'':9s} max violation per log interval: {r['trajectory']}")
    print(f"\nplots: {out}/expert_load_<run>.png")


if __name__ == "__main__":
    main()

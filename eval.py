"""Selective expert use (EMO-modular) on a trained checkpoint: for each domain, choose a share of every
layer's experts from a few of its training documents (emo.select_experts), prune the rest
(emo.prune_experts), and measure that domain's validation loss and the pruned model's size. Then report
how specialised each layer's routing is (emo.specialization).

python eval.py --checkpoint=runs/modular/latest.pt
python eval.py --checkpoint=runs/modular --keep=1,0.5,0.25,0.125 --calib_rows=8 --eval_rows=64 --json
"""

import argparse
import copy
import json
import math
import sys

import torch

import emo
import train
from data.corpus import Corpus, DataError
from emo import SettingError, require


@torch.no_grad()
def domain_loss(model, x, y, bytes_of):
    """Mean loss per token (nats) and bits per byte of model on the windows x -> y (as train.evaluate)."""
    ce = model(x, y, reduction="none")["ce"].double()
    n_bytes = bytes_of[y].double()
    return ce.mean().item(), (ce[n_bytes > 0].sum() / (math.log(2) * n_bytes.sum())).item()


def evaluate_subsets(model, train_data, val_data, keep_shares, calib_rows, eval_rows):
    """{domain: {share: loss}}, the same in bits per byte, and {share: total parameters} for the model
    pruned per domain."""
    E, T = model.config.n_experts, model.config.seq_len
    losses, bpb, sizes = {}, {}, {}
    for d, name in enumerate(val_data.domains):
        calibration = [train_data.domain_batch(d, calib_rows, T)[0]]
        x, y = val_data.domain_batch(d, eval_rows, T)
        losses[name], bpb[name] = {}, {}
        for share in keep_shares:
            n = max(1, round(share * E))
            pruned = model if n == E else emo.prune_experts(copy.deepcopy(model),
                                                            emo.select_experts(model, calibration, n))
            losses[name][share], bpb[name][share] = domain_loss(pruned.eval(), x, y, val_data.token_bytes())
            sizes[share] = pruned.num_params()
    return losses, bpb, sizes


def specialization(model, val_data, rows):
    T = model.config.seq_len
    batches = []
    for d in range(len(val_data.domains)):
        x, _ = val_data.domain_batch(d, rows, T)
        batches.append((x, torch.full_like(x, d)))
    return emo.specialization(model, batches)


def parse_shares(text):
    """--keep's comma-separated shares of each layer's experts, each in (0, 1]."""
    try:
        shares = [float(v) for v in text.split(",")]
    except ValueError:
        shares = []
    require(shares and all(0 < v <= 1 for v in shares), "--keep", text, "comma-separated shares in (0, 1], "
            "e.g. 1,0.5,0.25")
    return shares


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", required=True, help="a checkpoint, or a run folder (its latest.pt)")
    p.add_argument("--data", help="corpus folder (default: the run's)")
    p.add_argument("--keep", default="1,0.5,0.25,0.125", help="shares of each layer's experts to keep")
    p.add_argument("--calib_rows", type=int, default=8, help="training windows per domain to choose experts")
    p.add_argument("--eval_rows", type=int, default=64, help="validation windows per domain")
    p.add_argument("--json", action="store_true")
    args = p.parse_args(argv)
    try:
        keep = parse_shares(args.keep)
        for flag in ("calib_rows", "eval_rows"):
            require(getattr(args, flag) >= 1, f"--{flag}", getattr(args, flag), "a positive integer")
        state, path = train.load_checkpoint(args.checkpoint, flag="--checkpoint")
        model = train.model_from_checkpoint(state, path, pool_size=None, pool_size_range=None).eval()
        cfg = model.config
        data = args.data or state["settings"]["data"]
        train_data, val_data = Corpus(data, "train"), Corpus(data, "val")
        losses, bpb, sizes = evaluate_subsets(model, train_data, val_data, keep, args.calib_rows, args.eval_rows)
        report = specialization(model, val_data, args.eval_rows)
    except (SettingError, DataError) as err:
        sys.exit(f"eval.py: {err}")
    if args.json:
        print(json.dumps({"losses": losses, "bpb": bpb, "params": sizes, "specialization": report}, indent=1))
        return
    print(f"{args.checkpoint}: E={cfg.n_experts}, top_k={cfg.top_k}; experts chosen per domain from "
          f"{args.calib_rows} training windows, loss on {args.eval_rows} validation windows (routing without pools);"
          f" bits per byte (change from the first column)")
    print(f"{'domain':>10} " + " ".join(f"{f'keep {s:.1%}':>16}" for s in keep))
    for name, row in bpb.items():
        full = row[keep[0]]
        print(f"{name:>10} " + " ".join(f"{v:>8.4f} ({v - full:+.3f})" if s != keep[0] else f"{v:>16.4f}"
                                        for s, v in row.items()))
    print(f"{'params':>10} " + " ".join(f"{sizes[s] / 1e6:>14.2f} M" for s in keep))
    print(f"{'bf16 size':>10} " + " ".join(f"{2 * sizes[s] / 1e6:>13.1f} MB" for s in keep))
    print("routing specialization per layer (nmi: I(domain; expert) / H(domain); entropy: usage / log E):")
    for layer, r in enumerate(report):
        print(f"  layer {layer}: nmi {r['nmi']:.3f} | " + " | ".join(
            f"{name}: entropy {h:.2f}, top {top}" for name, h, top in zip(val_data.domains, r["entropy"], r["top"])))


if __name__ == "__main__":
    main()

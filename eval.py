"""Selective expert use (EMO-modular) on a trained checkpoint: for each domain, choose a share of every
layer's experts from a few of its training documents (emo.select_experts), prune the rest
(emo.prune_experts), and measure that domain's validation loss and the pruned model's size; with
--finetune_steps, also after finetuning the pruned copy on that domain's training documents (allenai/EMO's
prune-then-finetune). Then report how specialised each layer's routing is (emo.specialization).

python eval.py --checkpoint=runs/modular/latest.pt
python eval.py --checkpoint=runs/modular --keep=1,0.5,0.25,0.125 --calib_rows=8 --eval_rows=64 --json
python eval.py --checkpoint=runs/modular --finetune_steps=50 --finetune_lr=3e-4 --finetune_batch=16
python eval.py --checkpoint=runs/modular --keep=0.25 --export=hf/modular   # Hugging Face folders (export.py)
"""

import argparse
import copy
import json
import keyword
import math
import sys
from pathlib import Path

import torch

import emo
import export
import flags
import runs
import train
from data.corpus import Corpus, DataError, fingerprint, fingerprint_change
from emo import SettingError, require


@torch.no_grad()
def domain_loss(model, x, y, bytes_of):
    """Mean loss per token (nats) and bits per byte of model on the windows x -> y (as train.evaluate)."""
    ce = model(x, y, reduction="none")["ce"].double()
    n_bytes = bytes_of[y].double()
    return ce.mean().item(), (ce[n_bytes > 0].sum() / (math.log(2) * n_bytes.sum())).item()


def finetune(model, x, y, steps, batch, lr, settings):
    """Train the (pruned) model on one domain's training windows x -> y for `steps` AdamW steps of `batch`
    windows, cycling through them, at a constant lr (allenai/EMO: 1 epoch, lr 5e-5, batch 32, at 1B active);
    weight decay, betas and clipping are the run's. Routing runs over the kept experts, without pools."""
    optimizer = train.make_optimizer(model, argparse.Namespace(**{**settings, "lr": lr}), torch.device("cpu"))
    model.train()
    for step in range(steps):
        rows = torch.arange(step * batch, (step + 1) * batch) % len(x)
        train.train_step(model, optimizer, [(x[rows], y[rows])], lr, settings["grad_clip"], None)
    return model.eval()


def evaluate_subsets(model, train_data, val_data, keep_shares, calib_rows, eval_rows, tuning=None, keep_model=None):
    """Per domain and share of experts kept: {"loss", "bpb"} of the model pruned for that domain (and with
    tuning = dict(steps, batch, lr, settings): "finetuned_loss", "finetuned_bpb" after finetune); and
    {share: total parameters}. keep_model(domain, share, model, chosen): called with each pruned (and
    finetuned) model and the expert ids each layer kept, e.g. to export it."""
    E, T = model.config.n_experts, model.config.seq_len
    results, sizes = {}, {}
    for d, name in enumerate(val_data.domains):
        calibration = [train_data.domain_batch(d, calib_rows, T)[0]]
        x, y = val_data.domain_batch(d, eval_rows, T)
        results[name] = {}
        for share in keep_shares:
            n = max(1, round(share * E))
            chosen = emo.select_experts(model, calibration, n)
            pruned = emo.prune_experts(copy.deepcopy(model), chosen)
            loss, bpb = domain_loss(pruned.eval(), x, y, val_data.token_bytes())
            results[name][share] = dict(loss=loss, bpb=bpb)
            if tuning:
                tx, ty = train_data.domain_batch(d, tuning["steps"] * tuning["batch"], T)
                try:
                    pruned = finetune(pruned, tx, ty, **tuning)
                except train.NonFiniteLoss as err:
                    raise diverged(tuning, name, share, err) from None
                loss, bpb = domain_loss(pruned, x, y, val_data.token_bytes())
                largest = max(p.abs().max().item() for p in pruned.parameters())
                if not (math.isfinite(loss) and largest < DIVERGED_WEIGHT):
                    raise diverged(tuning, name, share, f"validation loss {loss:.4g}, largest weight {largest:.3g}")
                results[name][share].update(finetuned_loss=loss, finetuned_bpb=bpb)
            sizes[share] = pruned.num_params()
            if keep_model and share < 1:
                keep_model(name, share, pruned, chosen)
    return results, sizes


# No trained weight comes near this; a finetune that pushes one past it has diverged, even where the loss stays
# finite (RMSNorm rescales 1e30 weights: --finetune_lr=1e30 gave a finite loss and a model of 1e30 weights)
DIVERGED_WEIGHT = 1e4


def diverged(tuning, domain, share, what):
    """The one line for a finetune that diverged: the domain, the share kept, and the flag to lower."""
    return SettingError(f"--finetune_lr={tuning['lr']:g}: finetuning domain {domain!r}'s {share:g} of the experts "
                        f"diverged ({what}): give a lower --finetune_lr")


def export_targets(export_dir, domains, keep):
    """The folders --export writes: DIR/full, and DIR/<domain>-keep<share> for each share below 1."""
    return [Path(export_dir) / "full"] + [Path(export_dir) / f"{d}-keep{s:g}" for d in domains for s in keep if s < 1]


def check_export(args, model, domains, keep):
    """Everything --export needs, before any work: transformers, a model and shares stock classes represent,
    and target folders that lose nothing (export.export_problem)."""
    export.transformers_or_refuse()
    export.check_exportable(model)
    n, least = min(round(s * model.config.n_experts) for s in keep), export.min_experts(model.config.router)
    require(n >= least, "--keep", args.keep or DEFAULT_KEEP, f"shares that keep at least {least} of the "
            f"E={model.config.n_experts} experts to export a {model.config.router}-router model (one keeps {n})")
    for folder in export_targets(args.export, domains, keep):
        why = export.export_problem(folder)
        require(not why, "--export", args.export, f"a folder whose exports lose nothing: {folder} {why}; give "
                "another --export")


# A token's surface form, the other thing routing may follow (EMO-modular sec. 5: a standard MoE's experts
# specialise by punctuation and prepositions, EMO's by domain).
TOKEN_CLASSES = ("whitespace", "punctuation", "digits", "keyword", "word", "other")
KEYWORDS = set(keyword.kwlist) | {"int", "char", "void", "return", "struct", "const", "static", "unsigned",
                                  "sizeof", "typedef", "include", "define", "self", "the", "of", "to", "and",
                                  "in", "a", "for", "on", "with", "by", "from", "at"}  # code and prose function words


def token_class(text):
    word = text.strip()
    if not text or "\ufffd" in text:  # a token that is part of a character, or <|endoftext|>
        return "other"
    if not word:
        return "whitespace"
    if word.isdigit():
        return "digits"
    if word in KEYWORDS:
        return "keyword"
    if word.replace("_", "a").isalnum():
        return "word"
    if not any(c.isalnum() for c in word):
        return "punctuation"
    return "other"


def token_classes(encoding, vocab_size):
    """Each token id's class (an index into TOKEN_CLASSES), [vocab_size]."""
    names = [token_class(encoding.decode([i])) for i in range(vocab_size)]
    return torch.tensor([TOKEN_CLASSES.index(n) for n in names])


def specialization(model, val_data, rows):
    """Per layer, emo.routing_report of the validation windows of every domain, labelled by domain and by
    token class: {"domain": [...], "surface": [...]}, and the names of both labels' values."""
    T = model.config.seq_len
    classes = token_classes(val_data.encoding(), val_data.vocab_size)
    windows = [val_data.domain_batch(d, rows, T)[0] for d in range(len(val_data.domains))]
    return dict(domain=emo.specialization(model, [(x, torch.full_like(x, d)) for d, x in enumerate(windows)]),
                surface=emo.specialization(model, [(x, classes[x]) for x in windows]), domains=list(val_data.domains),
                classes=list(TOKEN_CLASSES))


def check_corpus(args, state, cfg, data, corpus):
    """The corpus must be tokenized as the model was (the end-of-text id is the last id of GPT-2's compact
    vocabularies, so it names the vocabulary); the run's own corpus, read by default, must be the one it
    trained on."""
    if corpus.eot_id != cfg.eot_id:
        raise SettingError(f"--data={data}: its vocabulary ({corpus.vocab_size} tokens, end-of-text id "
                           f"{corpus.eot_id}) is not the model's (end-of-text id {cfg.eot_id}): its numbers would "
                           f"mean nothing; give a corpus prepared with the run's --vocab_size")
    changed = not args.data and fingerprint_change(state["data"], fingerprint(data))
    if changed:
        raise SettingError(f"{data}, the run's corpus, changed since the checkpoint ({changed}): give --data=PATH "
                           f"to evaluate on another corpus on purpose")


DEFAULT_KEEP = "1,0.5,0.25,0.125"


def kept_counts(shares, n_experts, strict=True):
    """--keep's shares as the shares really kept: a whole number of each layer's experts. Given shares that
    round to one count, or to none, are refused rather than relabelled; the default just drops them."""
    counts = [round(share * n_experts) for share in shares]
    if not strict:
        counts = [n for n in dict.fromkeys(counts) if n >= 1]
    require(min(counts) >= 1, "--keep", ",".join(f"{v:g}" for v in shares),
            f"shares of at least 1/{n_experts} (the model has E={n_experts}: {min(shares):g} keeps no expert)")
    require(len(set(counts)) == len(counts), "--keep", ",".join(f"{v:g}" for v in shares),
            f"shares that keep different numbers of the E={n_experts} experts (they keep {counts})")
    return [count / n_experts for count in counts]


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
    p = flags.ArgumentParser(prog="eval.py", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", required=True, help="a checkpoint, or a run folder (its latest.pt)")
    p.add_argument("--data", help="corpus folder (default: the run's)")
    p.add_argument("--keep", help="shares of each layer's experts to keep (default 1,0.5,0.25,0.125, those of "
                   "them that keep a whole, different number of the model's experts)")
    p.add_argument("--calib_rows", type=int, default=8, help="training windows per domain to choose experts")
    p.add_argument("--eval_rows", type=int, default=64, help="validation windows per domain")
    p.add_argument("--finetune_steps", type=int, default=0, help="finetune each pruned copy on its domain (0: no)")
    p.add_argument("--finetune_lr", type=float, default=3e-4, help="finetuning's constant learning rate")
    p.add_argument("--finetune_batch", type=int, default=16, help="training windows per finetuning step")
    p.add_argument("--export", metavar="DIR", help="also write Hugging Face folders (export.py): DIR/full, and "
                   "DIR/<domain>-keep<share> for each share below 1 (pruned, and finetuned with --finetune_steps)")
    p.add_argument("--json", action="store_true", help="print the results as JSON")
    args = p.parse_args(argv)
    try:
        keep = parse_shares(args.keep or DEFAULT_KEEP)
        for flag in ("calib_rows", "eval_rows", "finetune_batch"):
            require(getattr(args, flag) >= 1, f"--{flag}", getattr(args, flag), "a positive integer")
        require(args.finetune_steps >= 0, "--finetune_steps", args.finetune_steps, "an integer >= 0 (0: no finetuning)")
        require(math.isfinite(args.finetune_lr) and args.finetune_lr > 0, "--finetune_lr", args.finetune_lr,
                "a finite number > 0")
        state, path = runs.load_checkpoint(args.checkpoint, flag="--checkpoint", settings_type=train.Settings)
        model = runs.model_from_checkpoint(state, path, pool_size=None, pool_size_range=None).eval()
        cfg = model.config
        data = args.data or state["settings"]["data"]
        train_data, val_data = Corpus(data, "train"), Corpus(data, "val")
        check_corpus(args, state, cfg, data, train_data)
        keep = kept_counts(keep, cfg.n_experts, strict=args.keep is not None)
        tuning = args.finetune_steps and dict(steps=args.finetune_steps, batch=args.finetune_batch,
                                              lr=args.finetune_lr, settings=state["settings"])
        exported = []

        source = {"checkpoint": str(path), "run": state["run"], "step": state["step"]}

        def keep_model(domain, share, pruned, chosen):  # each export checked on its domain's windows
            folder = export.export(pruned, f"{args.export}/{domain}-keep{share:g}", train_data.vocab_size, chosen,
                                   source={**source, "domain": domain, "keep": share})
            x = val_data.domain_batch(val_data.domains.index(domain), args.eval_rows, cfg.seq_len)[0]
            exported.append((folder, export.logits_difference(pruned, folder, x)))

        if args.export:
            check_export(args, model, val_data.domains, keep)
            folder = export.export(model, f"{args.export}/full", train_data.vocab_size, source=source)
            x = val_data.batch(0, 16, cfg.seq_len, seed=0)[0]  # the first validation batch, as train.py's evals
            exported.append((folder, export.logits_difference(model, folder, x)))
        results, sizes = evaluate_subsets(model, train_data, val_data, keep, args.calib_rows, args.eval_rows, tuning,
                                          keep_model if args.export else None)
        report = specialization(model, val_data, args.eval_rows)
    except (SettingError, DataError, train.TrainingError) as err:
        sys.exit(f"eval.py: {err}")
    if args.json:
        print(json.dumps(runs.finite_or_null({"domains": results, "params": sizes, "specialization": report,
                                              "exported": {str(f): diff for f, diff in exported}}),
                         indent=1, allow_nan=False))
        return
    print(f"{args.checkpoint}: E={cfg.n_experts}, top_k={cfg.top_k}; experts chosen per domain from "
          f"{args.calib_rows} training windows, loss on {args.eval_rows} validation windows (routing without pools);"
          f" bits per byte (change from the first column)"
          + (f"; +ft: after {args.finetune_steps} finetuning steps of {args.finetune_batch} windows at lr "
             f"{args.finetune_lr:g}" if tuning else ""))
    print(f"{'domain':>10} " + " ".join(f"{f'keep {s:.1%}':>16}" for s in keep))
    for name, row in results.items():
        for key, label in (("bpb", name), ("finetuned_bpb", "+ft")) if tuning else (("bpb", name),):
            full = row[keep[0]]["bpb"]
            print(f"{label:>10} " + " ".join(f"{r[key]:>8.4f} ({r[key] - full:+.3f})"
                                             if (s, key) != (keep[0], "bpb") else f"{r[key]:>16.4f}"
                                             for s, r in row.items()))
    print(f"{'params':>10} " + " ".join(f"{sizes[s] / 1e6:>14.2f} M" for s in keep))
    print(f"{'bf16 size':>10} " + " ".join(f"{2 * sizes[s] / 1e6:>13.1f} MB" for s in keep))
    for folder, diff in exported:
        print(f"Hugging Face folder {folder}: max |logits - emo's| {diff['fp32']:.1e} in fp32 (emo's own fp32 "
              f"rounding: {diff['emo_fp32_rounding']:.1e}), {diff['float64']:.1e} in float64, on its validation windows")
    print("routing specialization per layer: how much the chosen experts reveal a token's domain, I(domain; "
          "expert) / H(domain), and its surface form (" + ", ".join(TOKEN_CLASSES) + "), I(class; expert) / "
          "H(class); per domain, usage entropy / log E and the most used experts")
    for layer, (r, form) in enumerate(zip(report["domain"], report["surface"])):
        print(f"  layer {layer}: domain {r['nmi']:.3f}, surface {form['nmi']:.3f} | " + " | ".join(
            f"{name}: entropy {h:.2f}, top {top}" for name, h, top in zip(val_data.domains, r["entropy"], r["top"])))


if __name__ == "__main__":
    main()

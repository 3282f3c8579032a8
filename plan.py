"""Print EMO-progressive's stage schedule: experts, token budgets, costs and predicted loss per stage,
beside a fixed-E baseline. The rule and the law live in emo.py (plan_stages, ScalingLaw).

python plan.py                                  # configs/gpu-8x.json's run (8 GPUs, 20B tokens)
python plan.py --preset=paper                   # the paper's main run: ~1.1B active, 1.92T tokens, 8..128
python plan.py --n_active=3e8 --total_tokens=2e10 --experts=8,16,32,64 --top_k=8 --batch_tokens=524288
python plan.py --fit=runs/repro/fixed-2-seed0,runs/repro/fixed-32-seed0 --fit_params=delta --save_law=law.json
python plan.py --config=configs/paper-modular.json --world_size=8   # a train.py recipe: its stages, memory per GPU
python plan.py --step_times=step.json           # step time ~ E^rho measured: bench.py step --json > step.json
python plan.py --json                           # the same as JSON
"""

import argparse
import json
import math
import os
import sys
from pathlib import Path

import emo
import flags
import runs
import train
from emo import SettingError, require

# The paper's main run (as reported): 16 layers, d_model 2048, fine-grained experts of hidden 768,
# 8 active + 1 shared, seq 8192, 8M-token batches, 1.92T tokens, E = 8 -> 128. Our embedding is tied, so
# the shape gives ~1.05B active; --n_active sets the 1.1B the paper reports for the law.
PRESETS = {
    "paper": dict(n_active=1.1e9, total_tokens=1.92e12,
                  experts="8,16,32,64,128", top_k=8, batch_tokens=8_388_608, d_model=2048, n_layer=16,
                  n_head=16, d_expert=768, n_shared=1, seq_len=8192),
}
CHECKPOINT_BYTES = 12  # a checkpoint keeps fp32 weights and both AdamW moments of every parameter
PAPER_SPLIT = {8: 23.5, 16: 9.5, 32: 16.5, 64: 21.8, 128: 28.6}  # % of tokens per stage, as reported


def parse_args(argv):
    p = flags.ArgumentParser(prog="plan.py", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", choices=sorted(PRESETS), help="a named run; other flags override its values")
    p.add_argument("--n_active", type=float, help="the law's N (default: emo.law_active_params of the model shape: "
                   "active parameters with the tied embedding counted twice, as the law counts them)")
    p.add_argument("--total_tokens", type=float, default=2e10, help="tokens of the whole run")
    p.add_argument("--experts", default="8,16,32,64", help="expert count per stage, increasing")
    p.add_argument("--top_k", type=int, default=8, help="routed experts per token (fixed through growth)")
    p.add_argument("--batch_tokens", type=int, default=524_288, help="tokens per optimizer step (0: no rounding)")
    p.add_argument("--d_model", type=int, default=768, help="model width")
    p.add_argument("--n_layer", type=int, default=12, help="transformer blocks")
    p.add_argument("--n_head", type=int, default=12, help="attention heads")
    p.add_argument("--d_expert", type=int, default=384, help="hidden size of one expert")
    p.add_argument("--n_shared", type=int, default=1, help="always-on shared experts")
    p.add_argument("--seq_len", type=int, default=1024, help="tokens per window")
    p.add_argument("--vocab_size", type=int, default=50304, help="padded vocabulary")
    p.add_argument("--config", metavar="JSON", help="a train.py config file: its model, stages, tokens and batch "
                   "(train.py's defaults for what it leaves out); other flags override its values")
    p.add_argument("--world_size", type=int, default=8, help="GPUs the run is spread over: per-GPU memory under "
                   "DDP and FSDP2, and the batch of a --config that sets no batch_tokens")
    p.add_argument("--gpu_memory", type=float, default=80, help="GB of memory a GPU has (H100: 80)")
    p.add_argument("--batch_size", type=int, default=16, help="windows of seq_len in one GPU's micro-batch (its "
                   "activation memory)")
    p.add_argument("--dtype", choices=["bf16", "fp32"], default="bf16", help="the GPU run's autocast dtype")
    p.add_argument("--doc_attention", action="store_true", help="attention kept inside documents (a [T, T] mask)")
    p.add_argument("--checkpoint_interval", type=int, default=1000, help="optimizer steps between checkpoints: "
                   "how many a run writes, and how much")
    p.add_argument("--grow_after", type=int, default=0, help="the law's stage ends up to the end of this stage, "
                   "then every later E at once, one step apart, as train.py --grow_after plans them (train.py's "
                   "default is 2; 0, the GPU recipes': the law's own split)")
    p.add_argument("--law", metavar="JSON", help="plan with these coefficients (a --save_law file) instead of "
                   "Table 3's")
    p.add_argument("--fit", metavar="RUN,...", help="refit the law first to train.py runs (folders or their "
                   "metrics.jsonl): stage ends, and the whole curve of one-stage (fixed-E) runs")
    p.add_argument("--fit_params", help="with --fit: auto (the default), every coefficient the runs determine, "
                   "beside an early transient; or names to refit exactly those, e.g. delta (alone it also takes "
                   "every mismatch of the token term)")
    p.add_argument("--save_law", metavar="JSON", help="write the law planned with (refit or not) for train.py --law")
    p.add_argument("--step_time_exponent", type=float, default=STEP_TIME_EXPONENT,
                   help="rho in step time ~ E^rho (default: the paper's 1.08x from E=8 to 128)")
    p.add_argument("--step_times", metavar="JSON|E:SECONDS,...",
                   help="measured step times, from `bench.py step --json` or as 8:0.101,128:0.109: fit rho to them")
    p.add_argument("--peak_flops", type=float, default=989e12, help="per GPU, bf16 dense (H100/H200)")
    p.add_argument("--mfu", type=float, default=0.4, help="assumed MFU of the fixed-E run, for GPU-hours")
    p.add_argument("--json", action="store_true", help="print the plan as JSON")
    args = p.parse_args(argv)
    p.set_defaults(**dict.fromkeys(vars(args)))  # parsed again with every default None: what was given, even
    explicit = {k for k, v in vars(p.parse_args(argv)).items() if v is not None}  # at its default value
    # a preset's or a config file's values replace the defaults, flags given explicitly still win
    for key, value in {**(PRESETS[args.preset] if args.preset else {}),
                       **(config_shape(args.config, args.world_size) if args.config else {})}.items():
        if key not in explicit:
            setattr(args, key, value)
    return args


def memory_per_gpu(cfg, fixed, args):
    """Bytes one GPU holds at the last stage's E under DDP and under FSDP2 (train.memory_need's parts), and the
    size of a checkpoint."""
    bf16 = args.dtype == "bf16"
    ddp, fsdp = (train.memory_need(cfg, args.batch_size, bf16, args.world_size, sharded) for sharded in (False, True))
    steps = fixed["tokens"] // args.batch_tokens if args.batch_tokens else None
    saves = steps // args.checkpoint_interval + 1 if steps and args.checkpoint_interval else None  # + the end's
    return dict(gpus=args.world_size, ddp=sum(ddp.values()), fsdp=sum(fsdp.values()), ddp_parts=ddp,
                fsdp_parts=fsdp, checkpoint=CHECKPOINT_BYTES * fixed["params_total"], saves=saves)


def config_shape(path, world_size):
    """What plan.py needs of a train.py config file, as train.py resolves it (its defaults filled in)."""
    s, model, _ = train.parse([f"--config={path}"])
    experts, _ = train.parse_stages(s)
    cfg = emo.Config(**{**model, "n_experts": experts[-1]})
    return dict(experts=",".join(map(str, experts)), total_tokens=float(s.total_tokens), top_k=cfg.top_k,
                batch_tokens=train.batch_tokens_of(s, cfg, world_size)[1], d_model=cfg.d_model, n_layer=cfg.n_layer,
                n_head=cfg.n_head, d_expert=cfg.d_expert, n_shared=cfg.n_shared, seq_len=cfg.seq_len,
                vocab_size=cfg.vocab_size, batch_size=s.batch_size, dtype="fp32" if s.dtype == "fp32" else "bf16",
                doc_attention=cfg.doc_attention, checkpoint_interval=s.checkpoint_interval,
                grow_after=s.grow_after)


# Step time grows slowly with E at fixed k (more, smaller GEMMs; router; optimizer). The paper measured
# 1.08x from E = 8 to 128 at 1.1B active (Fig. 1): time(E) ~ E^rho with rho = ln 1.08 / ln 16.
STEP_TIME_EXPONENT = math.log(1.08) / math.log(16)


def step_time_exponent(experts, seconds):
    """Calibrate rho in time(E) ~ E^rho from step times measured at several E: least squares in log-log."""
    x = [math.log(E) for E in experts]
    y = [math.log(s) for s in seconds]
    mx, my = sum(x) / len(x), sum(y) / len(y)
    return sum((a - mx) * (b - my) for a, b in zip(x, y)) / sum((a - mx) ** 2 for a in x)


def stage_costs(stage, n_active, top_k, expert_params, last_experts, rho):
    """What a stage costs: total parameters, FLOPs, weight + gradient + Adam memory, and its step time
    relative to the last stage's (time ~ E^rho)."""
    total = n_active + (stage["experts"] - top_k) * expert_params
    return dict(params_total=total, params_active=n_active, flops=6 * n_active * stage["tokens"],
                memory_bytes=emo.BYTES_PER_PARAM * total, step_time=(stage["experts"] / last_experts) ** rho)


def check_args(args):
    """plan.py's own flags, before any planning: one line naming the flag."""
    finite = math.isfinite
    require(args.fit or args.fit_params is None, "--fit_params", args.fit_params, "given with --fit (it names what "
            "--fit refits)")
    if args.save_law:
        why = writable_file_problem(Path(args.save_law))
        require(not why, "--save_law", args.save_law, f"a file plan.py can write ({why})")
    args.fit_params = args.fit_params or "auto"
    free = args.fit_params.split(",")
    require(args.fit_params == "auto" or set(free) <= set(emo.LAW_COEFFICIENTS) and len(set(free)) == len(free),
            "--fit_params", args.fit_params, f"auto, or names of coefficients, each once: {', '.join(emo.LAW_COEFFICIENTS)}")
    require(finite(args.total_tokens) and args.total_tokens >= 1 and args.total_tokens == int(args.total_tokens),
            "--total_tokens", args.total_tokens, "a whole number of tokens >= 1")
    require(args.n_active is None or (finite(args.n_active) and args.n_active > 0), "--n_active", args.n_active,
            "a finite number > 0")
    require(args.world_size >= 1, "--world_size", args.world_size, "an integer >= 1")
    require(finite(args.gpu_memory) and args.gpu_memory > 0, "--gpu_memory", args.gpu_memory, "GB, a number > 0")
    require(args.grow_after >= 0, "--grow_after", args.grow_after, "an integer >= 0 (0: the law's own split)")
    require(args.batch_tokens >= 0, "--batch_tokens", args.batch_tokens, "an integer >= 0 (0: no rounding)")
    require(finite(args.peak_flops) and args.peak_flops > 0, "--peak_flops", args.peak_flops, "a finite number > 0")
    require(0 < args.mfu <= 1, "--mfu", args.mfu, "a fraction in (0, 1]")
    require(finite(args.step_time_exponent), "--step_time_exponent", args.step_time_exponent, "a finite number")
    try:
        experts = [int(E) for E in str(args.experts).split(",")]
    except ValueError:
        experts = None
    require(experts, "--experts", args.experts, "comma-separated integers, e.g. 8,16,32")
    return experts


def writable_file_problem(path):
    """Why a file cannot be written at path (a folder there, a missing or read-only folder), or None."""
    if path.is_dir():
        return "it is a folder"
    if not path.parent.is_dir():
        return f"no folder {path.parent}"
    if not os.access(path.parent, os.W_OK | os.X_OK) or (path.exists() and not os.access(path, os.W_OK)):
        return "not writable"
    return None


def build_plan(args):
    """Everything plan.py prints, as a dict: the stages, the fixed-E baseline and the savings."""
    experts = check_args(args)
    if args.batch_tokens and args.total_tokens >= args.batch_tokens:  # plan whole optimizer steps
        args.total_tokens = int(args.total_tokens) // args.batch_tokens * args.batch_tokens
    cfg = emo.Config(vocab_size=args.vocab_size, seq_len=args.seq_len, n_layer=args.n_layer, n_head=args.n_head,
                     d_model=args.d_model, n_experts=experts[-1], top_k=min(args.top_k, experts[-1]),
                     d_expert=args.d_expert, n_shared=args.n_shared, doc_attention=args.doc_attention)
    n_law = args.n_active or emo.law_active_params(cfg)  # the law's N; the costs count the model's own
    n_active = emo.count_params(cfg)[1]
    if args.step_times:
        args.step_time_exponent = step_time_exponent(*read_step_times(args.step_times))
    base = flags.read_law(args.law) if args.law else emo.ScalingLaw()
    law, before, fit = base, None, None
    if args.fit:
        records = [r for path in args.fit.split(",") for r in read_fit_records(path)]
        law, fit = fit_with_uncertainty(base, records, args.fit_params, n_law, int(args.total_tokens), experts,
                                        args.top_k, args.batch_tokens or None, args.grow_after)
        before = emo.plan_stages(n_law, int(args.total_tokens), experts, args.top_k, law=base,
                                 batch_tokens=args.batch_tokens or None, grow_after=args.grow_after)
    no_split = None
    try:
        stages = emo.plan_stages(n_law, int(args.total_tokens), experts, args.top_k, law=law,
                                 batch_tokens=args.batch_tokens or None, grow_after=args.grow_after)
    except SettingError as err:
        if not args.fit:
            raise
        optimal = [law.optimal_tokens(n_law, E / args.top_k) for E in experts]
        ends = ", ".join(f"E={E} to {d / optimal[-1]:.2%}" for E, d in zip(experts, optimal))
        no_split = (f"the refit law gives no usable stages ({err}); its stage ends as shares of the run: {ends}. A "
                    f"share near 0% says a larger pool pays at once at this scale; otherwise fit runs that span "
                    f"more tokens and E, or free fewer coefficients (--fit_params)")
        stages = before  # costs below are Table 3's (or --law's) plan; the refit's split is not one
    if args.save_law:
        values = {k: float(getattr(law, k)) for k in emo.LAW_COEFFICIENTS}
        why = emo.law_problem(values)
        require(not why, "--save_law", args.save_law, f"given a usable law: the law planned with is not one ({why})")
        runs.atomic_write(Path(args.save_law), lambda f: f.write(json.dumps(values, indent=1).encode()))
    # GPU-hours: the fixed-E run at the assumed MFU; earlier stages are faster by the step-time model
    hours_fixed = emo.flops_per_token(cfg) * args.total_tokens / (args.peak_flops * args.mfu) / 3600
    expert_params = args.n_layer * 3 * args.d_model * args.d_expert  # one routed expert in every layer
    for s in stages:
        s.update(stage_costs(s, n_active, args.top_k, expert_params, experts[-1], args.step_time_exponent))
        s["gpu_hours"] = hours_fixed * s["fraction"] * s["step_time"]
    last = stages[-1]
    fixed = dict(experts=last["experts"], tokens=int(args.total_tokens), params_total=last["params_total"],
                 memory_bytes=last["memory_bytes"], gpu_hours=hours_fixed,
                 loss=law.loss(n_law, args.total_tokens, last["e"]))
    hours = sum(s["gpu_hours"] for s in stages)
    return dict(n_law=n_law, n_active=n_active, law={k: getattr(law, k) for k in emo.LAW_COEFFICIENTS}, stages=stages,
                base_law={k: getattr(base, k) for k in emo.LAW_COEFFICIENTS} if before else None, fit=fit,
                base_split=[s["fraction"] for s in before] if before else None,
                no_split=no_split, fixed=fixed, memory_per_gpu=memory_per_gpu(cfg, fixed, args), gpu_hours=hours,
                gpu_hours_saving=1 - hours / hours_fixed,
                early_memory_saving=1 - sum(s["memory_bytes"] * s["fraction"] for s in stages) / fixed["memory_bytes"])


def fit_with_uncertainty(base, records, fit_params, n_law, total_tokens, experts, top_k, batch_tokens, grow_after):
    """plan.py --fit: the law refit to the records (fit_params "auto": what they identify, and the transient),
    and what the fit knows: per coefficient its 10-90 % range over bootstrap refits, or that it was held because
    the runs cannot determine it; the same range for each stage's end (as --grow_after places it). Returns (law,
    that report)."""
    free = emo.identified(base, records, emo.LAW_COEFFICIENTS) if fit_params == "auto" else fit_params.split(",")
    law, values = emo.fit_law(base, records, free=free)
    fits = emo.bootstrap_fits(law, values, records, free)
    ranges = {k: [emo.quantile([v[k] for _, v in fits], q) for q in (0.1, 0.9)] if len(fits) > 1 else None for k in free}
    splits = []
    for refit, _ in fits:
        try:
            splits.append([s["end"] for s in emo.plan_stages(n_law, total_tokens, experts, top_k, law=refit,
                                                              batch_tokens=batch_tokens, grow_after=grow_after)])
        except SettingError:
            pass
    ends = [[emo.quantile([e[i] for e in splits], q) for q in (0.1, 0.9)] for i in range(len(experts))] if splits else None
    return law, dict(free=free, held=[k for k in emo.LAW_COEFFICIENTS if k not in free], values=values,
                     ranges=ranges, bootstrap=len(fits), usable_splits=len(splits), end_ranges=ends)


def read_fit_records(path):
    """What a train.py run measured for the law, from its metrics.jsonl (or its run folder): each stage's end
    (kind "stage") and, for a run of one stage (a fixed-E pilot), also every validation eval made at the peak
    learning rate, so that its curve and not one point is fitted. Evals during warmup, re-warm or the final
    decay are left out: WSD's decay drops the loss by an amount that depends on the schedule, not on E or D.
    Each record has law_n_active, tokens, experts, top_k and val_loss, positive and finite."""
    path = Path(path)
    path = path / "metrics.jsonl" if path.is_dir() else path
    try:
        with open(path) as f:
            records = [json.loads(line) for line in f if line.strip()]
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise SettingError(f"--fit={path}: cannot read JSONL records ({type(err).__name__})") from None
    records = [r for r in records if isinstance(r, dict)]
    stages = [r for r in records if r.get("kind") == "stage"]
    if not stages:
        raise SettingError(f"--fit={path}: no stage records (lines with \"kind\": \"stage\") in the file")
    for n, r in enumerate(stages, 1):
        bad = [k for k in emo.FIT_KEYS if not (is_number(r.get(k)) and r[k] > 0)]
        if bad:
            raise SettingError(f"--fit={path}: stage record {n} needs positive numbers for {', '.join(bad)}")
    if len(stages) > 1:
        return stages
    if type(stages[0].get("step")) is not int or stages[0]["step"] < 1:
        raise SettingError(f"--fit={path}: its stage record needs a positive integer step")
    lr = {r.get("step"): r.get("lr") for r in records if r.get("kind") == "step" and is_number(r.get("lr"))}
    peak, stage = max(lr.values(), default=0), stages[0]
    evals = [r for r in records if r.get("kind") == "eval"]
    for r in evals:
        if type(r.get("step")) is not int or not (is_number(r.get("val_loss")) and r["val_loss"] > 0):
            raise SettingError(f"--fit={path}: eval record at step {r.get('step')!r} needs an integer step and a "
                               f"positive finite val_loss (it has {str(r.get('val_loss'))[:20]})")
    return [dict(stage, kind="eval", step=r["step"], tokens=r["step"] * stage["tokens"] // stage["step"],
                 val_loss=r["val_loss"])
            for r in evals if r["step"] < stage["step"] and lr.get(r["step"], 0) >= 0.999 * peak] + stages


def is_number(v):
    """A finite int or float that is not a bool (JSON's true is not 1.0)."""
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def read_step_times(value):
    """([E, ...], [seconds, ...]) from bench.py step's JSON file or an inline E:seconds list."""
    try:
        if value.endswith(".json"):
            with open(value) as f:
                rows = json.load(f)["rows"]
            pairs = [(r["experts"], r["step_seconds"]) for r in rows]
        else:
            pairs = [(int(E), float(sec)) for E, sec in (item.split(":") for item in value.split(","))]
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise SettingError(f"--step_times={value}: expected bench.py step's --json output or E:seconds pairs like "
                         f"8:0.101,128:0.109 ({err})") from None
    if len({E for E, _ in pairs}) < 2 or any(E <= 0 or not sec > 0 or not math.isfinite(sec) for E, sec in pairs):
        raise SettingError(f"--step_times={value}: needs positive step times at two or more different E")
    return [E for E, _ in pairs], [sec for _, sec in pairs]


def human(x):
    """1.23B-style counts."""
    for factor, suffix in ((1e12, "T"), (1e9, "B"), (1e6, "M"), (1e3, "K")):
        if abs(x) >= factor:
            return f"{x / factor:.3g}{suffix}"
    return f"{x:.3g}"


def print_plan(plan, args):
    if plan["no_split"]:  # a refit whose law plans no stages: what it measured, and why there is no plan
        print_fit(plan, args)
        return
    stages, fixed = plan["stages"], plan["fixed"]
    print(f"EMO-progressive plan: N={human(plan['n_law'])} for the law ({human(plan['n_active'])} active parameters), "
          f"{human(args.total_tokens)} tokens, "
          f"top_k={args.top_k}, batch={human(args.batch_tokens or 1)} tokens" +
          (f"; the law's ends to stage {args.grow_after}, then every E at once (--grow_after={args.grow_after})"
           if 0 < args.grow_after < len(stages) - 1 else ""))
    print(f"{'stage':>5} {'E':>5} {'tokens':>8} {'%':>6} {'steps':>8} {'FLOPs':>9} {'params':>7} "
          f"{'memory':>9} {'step t':>7} {'GPU-h':>9} {'loss':>7}")
    rows = [(str(s["stage"]), s) for s in stages] + [("fixed", dict(fixed, fraction=1, steps=None, step_time=1,
                                                                       flops=sum(s["flops"] for s in stages)))]
    for label, s in rows:
        steps = "" if s["steps"] is None else f"{s['steps']:,}"
        flag = "" if s.get("in_fit_range", True) else "  (e = E/k > 32: outside the law's fit range)"
        print(f"{label:>5} {s['experts']:>5} {human(s['tokens']):>8} {100 * s['fraction']:>5.1f}% {steps:>8} "
              f"{s['flops']:>9.2e} {human(s['params_total']):>7} {s['memory_bytes'] / 1e9:>6.1f} GB "
              f"{s['step_time']:>6.3f}x {s['gpu_hours']:>9.3g} {s['loss']:>7.4f}{flag}")
    print(f"progressive vs fixed E={fixed['experts']}: {plan['gpu_hours_saving']:.1%} fewer GPU-hours, "
          f"{plan['early_memory_saving']:.1%} less weight+optimizer memory (token-weighted), predicted final "
          f"loss {stages[-1]['loss'] - fixed['loss']:+.4f}")
    memory = plan["memory_per_gpu"]
    fits = lambda b: "fits" if b <= args.gpu_memory * 1e9 else "does not fit"
    print(f"memory per GPU at E={fixed['experts']}: DDP {memory['ddp'] / 1e9:.1f} GB ({fits(memory['ddp'])} "
          f"{args.gpu_memory:g} GB), FSDP2 over {memory['gpus']} GPUs {memory['fsdp'] / 1e9:.1f} GB "
          f"({fits(memory['fsdp'])}; train.py --shard=fsdp); a checkpoint (weights and moments) "
          f"{memory['checkpoint'] / 1e9:.1f} GB" + (f", {memory['saves']:,} of them at one every "
          f"{args.checkpoint_interval:,} steps: {memory['saves'] * memory['checkpoint'] / 1e12:.2f} TB written "
          f"(stage ends add one each)" if memory["saves"] else ""))
    ddp, fsdp = memory["ddp_parts"], memory["fsdp_parts"]
    print(f"  of which fp32 weights, gradients and AdamW moments {ddp['states'] / 1e9:.1f} GB (DDP) / "
          f"{fsdp['states'] / 1e9:.1f} GB (FSDP2); activations of {args.batch_size} windows of {args.seq_len} "
          f"({args.dtype}, eager) {ddp['activations'] / 1e9:.1f} GB; bf16 weight copies {ddp['copies'] / 1e9:.1f} GB "
          f"(DDP) / {fsdp['copies'] / 1e9:.1f} GB (FSDP2: two blocks gathered)")
    print(f"memory: fp32 weights + grads + Adam (16 B/param) and eager activations (emo.activation_bytes); step time ~ "
          f"E^{args.step_time_exponent:.4f}{' (fitted to --step_times)' if args.step_times else ''}; GPU-hours at {args.mfu:.0%} MFU of {args.peak_flops:.3g} FLOP/s")
    if plan["base_law"]:
        print_fit(plan, args)
    if [s["experts"] for s in stages] == list(PAPER_SPLIT):
        print("split, this plan: " + "  ".join(f"E={s['experts']}: {100 * s['fraction']:.1f}%" for s in stages))
        print("split, the paper: " + "  ".join(f"E={E}: {p}%" for E, p in PAPER_SPLIT.items()))


def print_fit(plan, args):
    """The refit beside the law it started from: each coefficient with its 10-90 % bootstrap range, or "held"
    when the runs cannot determine it; the transient; both splits, and the range of each refit stage end."""
    fit, stages, names = plan["fit"], plan["stages"], emo.LAW_COEFFICIENTS
    print(f"{'law':>9} " + " ".join(f"{k:>8}" for k in names))
    for label, law in ((args.law or "Table 3", plan["base_law"]), ("refit", plan["law"])):
        print(f"{label[-9:]:>9} " + " ".join(f"{law[k]:>8.4g}" for k in names))
    ranges = fit["ranges"]
    print(f"{'10-90 %':>9} " + " ".join(f"{'held':>8}" if k not in fit["free"] else f"{'?':>8}" if not ranges[k]
                                      else f"{f'{ranges[k][0]:.3g}..':>8}" for k in names))
    print(f"{'':>9} " + " ".join(f"{'':>8}" if k not in fit["free"] or not ranges[k] else f"{ranges[k][1]:>8.3g}"
                                 for k in names))
    if "t_size" in fit["free"]:
        print(f"early transient: {fit['values']['t_size']:.3g} nats fading over {human(fit['values']['t_tokens'])} "
              f"tokens (fitted beside the law, the same for every E)")
    print(f"held ({', '.join(fit['held']) or 'none'}): " + ("what these runs cannot determine (one model size "
          "leaves a, alpha, gamma and c one level per E)" if args.fit_params == "auto" else "not named in --fit_params"))
    print(f"uncertainty: {fit['bootstrap']} refits to the evals resampled within each E, "
          f"{fit['usable_splits']} of them give a split")
    for label, split in ((args.law or "Table 3", plan["base_split"]), ("refit", [s["fraction"] for s in stages])):
        if label == "refit" and plan["no_split"]:
            print(f"split, refit: none: {plan['no_split']}")
            continue
        print(f"split, {label}: " + "  ".join(f"E={s['experts']}: {100 * f:.1f}%" for s, f in zip(stages, split)))
    if fit["end_ranges"]:
        total = args.total_tokens
        print("stage ends, refit 10-90 %: " + "  ".join(f"E={s['experts']}: {100 * lo / total:.1f}..{100 * hi / total:.1f}%"
                                                        for s, (lo, hi) in zip(stages[:-1], fit["end_ranges"])))


def main(argv=None):
    args = parse_args(sys.argv[1:] if argv is None else argv)
    try:
        plan = build_plan(args)
    except (SettingError, runs.TrainingError) as err:
        sys.exit(f"plan.py: {err}")
    if args.json:
        print(json.dumps(runs.finite_or_null(plan), indent=1, allow_nan=False))
    else:
        print_plan(plan, args)


if __name__ == "__main__":
    main()

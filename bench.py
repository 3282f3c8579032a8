"""Benchmarks. Every number is measured in this run; ratios compare paths timed side by side.

python bench.py moe [--device=cuda] [--dtype=bf16] [--compile] [--json]
    one MoE layer, forward + backward, tokens/s for E in {8, 32, 128} at fixed top-k, beside
    (a) a naive masked per-expert loop and (b) a dense SwiGLU with the same active parameters.
python bench.py growth [--seeds=0,1] [--train_args="..."] [--json]
    train.py's default model (or --train_args's) through its stages once per growth init (gaussian / copy / silent):
    validation loss right before and right after each growth, steps until it is back, adoption of the
    new experts, and the final loss.
python bench.py step [--experts=8,16,32,64,128] [--train_args="..."] [--json]
    train.py's training step (its model and settings; --train_args changes them) at each E, top-k fixed:
    step time and its ratio to the first E, the optimizer step's share, peak and weight+grad+Adam memory,
    and the time of one growth E -> 2E. The fitted exponent of time ~ E^rho feeds plan.py --step_times.
python bench.py gpu [--train_args="..."] [--json]
    every CUDA path in one command, ~8 minutes on one H100: bf16 grouped dispatch vs the per-expert loop vs an
    fp32 per-token reference (both routers, pools, before and after growth); idle experts' zero gradient and
    no read past the last offset; a compiled bf16 progressive run (graphs per stage, falling loss, a resume at
    a stage boundary); torchrun with NCCL; moe and step at a GPU size. Writes runs/gpu/gpu.json and a table.
    On a machine without CUDA it runs the CPU-checkable part (the GPU path's numerics emulated) and names
    what it skipped. Exit status 1 if a check failed.
python bench.py repro [--seeds=0,1,2] [--experts=2,4,8,16,32] [--total_tokens=2.5e6] [--train_args="..."] [--json]
    the paper's claim at small scale: same model, data and tokens for fixed E_max, fixed E_max/2, the
    dense-equivalent fixed E = top_k, and progressive growth up to E_max with each growth init, one
    train.py process per run. Final val loss and bits per byte (overall, per domain), each arm's difference
    to fixed E_max seed by seed and its ratio to the spread, training time, tokens/s and memory per stage;
    curves.png with every arm and seed. A run folder that already holds a finished run of the same command
    is reused, not re-run: the same settings as config.json wrote them, in any folder of that name.
python bench.py frontier [--seeds=0,1,2] [--experts=2,4,8,16,32] [--trained_at=0.25] [--total_tokens=2.5e6] [--json]
    EMO-modular's memory-accuracy frontier, on configs/modular.json's recipe: a standard MoE, EMO-modular and
    modular + progressive growth, each pruned per domain to 100/50/25/12.5 % of its experts, beside MoE and
    dense models trained from scratch at the pruned sizes --trained_at (the paper's headline 25 % by default, so
    that 3 seeds take ~1.5 h on 2 CPU cores; 0.5,0.25,0.125 for every size); validation bits per byte (mean over
    domains) against the parameters kept, seed by seed, and frontier.png. Runs are reused as in repro.
python bench.py modular [--leads=paper,window,...] [--seeds=0,1,2] [--total_tokens=1e6] [--json]
    where EMO-modular's two gaps come from: per lead (one change to the paper's recipe), a standard MoE, EMO-modular
    and an MoE trained at the 25 % subset's size; seed by seed, modular - standard (whole models, and the modular
    model in causal pools), pruned to 25 % - trained at that size, the 12.5 % subset, and how much the chosen
    experts reveal a token's domain and surface form; specialization.png. Runs are reused as in repro.
"""

import argparse
import json
import math
import os
import platform
import shlex
import statistics
import subprocess
import sys
import time
from dataclasses import asdict
from pathlib import Path

import torch

import emo
import eval as evaluate
import flags
import folders
import plan
import report
import runs
import train
from data.corpus import Corpus, DataError
from emo import SettingError, require

HERE = Path(__file__).resolve().parent


def naive_moe(moe, x):
    """The nanoMoE / HF-Mixtral baseline: for each expert, find its tokens with a mask and run them."""
    idx, gates, _, _ = moe.route(x)
    y = torch.zeros_like(x)
    for e in range(moe.n_experts):
        token, slot = torch.where(idx == e)
        gate, up = (x[token] @ moe.w_in[e]).chunk(2, dim=-1)
        out = (torch.nn.functional.silu(gate) * up) @ moe.w_out[e]
        y.index_add_(0, token, out * gates[token, slot].unsqueeze(-1))
    return y


def timed(fn, device):
    """Wall time of fn(), with the GPU's queued work finished on both sides."""
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - start


def seconds_per_call(fn, x, repeats, device):
    """Median wall time of fn(x) forward + backward, after two warm-up calls."""
    times = [timed(lambda: fn(x).float().square().mean().backward(), device) for _ in range(repeats + 2)]
    return statistics.median(times[2:])


def bench_moe(args):
    device = torch.device(args.device)
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[args.dtype]
    return [moe_row(args, int(E), device, dtype) for E in args.experts.split(",")]


def moe_row(args, n_experts, device, dtype):
    """One E: tokens/s of every path, CUDA peak memory, the grouped path's MFU on active parameters."""
    cfg = emo.Config(d_model=args.d_model, d_expert=args.d_expert, n_experts=n_experts, top_k=args.top_k,
                     n_shared=0, n_head=4, n_layer=1)
    torch.manual_seed(0)
    moe = emo.MoE(cfg).to(device)
    dense = emo.SwiGLU(args.d_model, args.top_k * args.d_expert).to(device)  # same active parameters
    x = torch.randn(args.tokens, args.d_model, device=device, requires_grad=True)
    autocast = lambda: torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32)

    def grouped(x):
        with autocast():
            return moe(x.unsqueeze(0))[0]

    def loop(x):
        moe.use_grouped_mm = False
        try:
            return grouped(x)
        finally:
            moe.use_grouped_mm = True

    def naive(x):
        with autocast():
            return naive_moe(moe, x)

    def dense_ffn(x):
        with autocast():
            return dense(x)

    paths = {"grouped": grouped, "loop": loop, "naive": naive, "dense": dense_ffn}
    if args.compile:
        paths["grouped+compile"] = torch.compile(grouped, dynamic=False)
        paths["dense+compile"] = torch.compile(dense_ffn, dynamic=False)
    tps, peak = {}, {}
    for name, fn in paths.items():
        tracked = report.reset_peak_memory(device) and device.type == "cuda"  # a CPU's RSS says little per path
        tps[name] = args.tokens / seconds_per_call(fn, x, args.repeats, device)
        peak[name] = report.peak_memory(device) if tracked else None
    best = "grouped+compile" if args.compile else "grouped"
    active = args.top_k * 3 * args.d_model * args.d_expert + n_experts * args.d_model  # experts a token uses + router
    top = report.peak_flops(device)
    return {"experts": n_experts, "tokens_per_s": tps, "peak_memory": peak,
            "grouped_vs_dense": tps["grouped"] / tps["dense"], "grouped_vs_loop": tps["grouped"] / tps["loop"],
            "grouped_vs_naive": tps["grouped"] / tps["naive"],
            "compiled_grouped_vs_dense": tps["grouped+compile"] / tps["dense+compile"] if args.compile else None,
            "mfu": None if top is None else tps[best] * 6 * active / top}


def machine(device):
    """The GPU's name, or the CPU's model (from /proc/cpuinfo where there is one) and torch's threads."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    cpuinfo = Path("/proc/cpuinfo")
    names = [line.split(":", 1)[1].strip() for line in cpuinfo.read_text().splitlines()
             if line.startswith("model name")] if cpuinfo.exists() else []
    return f"{names[0] if names else platform.processor() or platform.machine()}, {torch.get_num_threads()} threads"


def print_moe(rows, args):
    print(f"MoE layer fwd+bwd, {args.tokens} tokens, d_model={args.d_model}, d_expert={args.d_expert}, "
          f"top_k={args.top_k}, {args.dtype}, {machine(torch.device(args.device))}, torch {torch.__version__}")
    names = list(rows[0]["tokens_per_s"])
    print(f"{'E':>5} " + " ".join(f"{n + ' tok/s':>22}" for n in names)
          + f" {'grouped/dense':>14} {'grouped/loop':>13} {'grouped/naive':>14} {'MFU':>6}")
    for r in rows:
        cells = " ".join(f"{r['tokens_per_s'][n]:>22,.0f}" for n in names)
        print(f"{r['experts']:>5} {cells} {r['grouped_vs_dense']:>13.2f}x {r['grouped_vs_loop']:>12.2f}x "
              f"{r['grouped_vs_naive']:>13.2f}x {percent(r['mfu']):>6}")
    if rows[0]["peak_memory"]["grouped"] is not None:
        print("CUDA peak MB: " + "; ".join(f"E={r['experts']}: " + ", ".join(
            f"{n} {v / 2**20:,.0f}" for n, v in r["peak_memory"].items()) for r in rows))
    print("MFU: the " + ("compiled " if args.compile else "") + "grouped path's FLOPs on active parameters "
          "(6 x top_k experts + router per token) over the GPU's dense bf16 peak")


def run_folder_problem(out):
    """Why bench.py may not (re)make the run folder out, or None: it may where out is missing, empty, or a folder
    bench.py made (its bench_arm.json) holding nothing but what bench.py and train.py write, with no training
    process in it. A user's own run, or their notes beside bench's files, are never deleted (folders.py)."""
    owner = runs.folder_owner(out)
    if owner:
        return f"is where a training process (pid {owner}) is running; wait for it to finish"
    return folders.replace_problem(out, "arm")


def clear_run_folder(out):
    """Make out anew for a bench run: what bench.py made there before is deleted (run_folder_problem refuses
    anything else, in one line), then the empty folder gets bench.py's proof of ownership, bench_arm.json."""
    why = run_folder_problem(out)
    if why:
        raise SettingError(f"{out} {why}: give another --out_dir")
    folders.clear(out)
    out.mkdir(parents=True)
    (out / folders.MARKERS["arm"]).write_text(json.dumps({"made_by": "bench.py", "pid": os.getpid()}))


def model_setting(args, key):
    """A model setting as --train_args gives it, else emo.Config's default."""
    return train.parse(shlex.split(args.train_args))[1].get(key, getattr(emo.Config, key))


def growth_flags(init, seed, out, args):
    """train.py flags of one growth run, on Table 3's split as the law plans it (no --grow_after, no closed loop),
    so that each growth has steps of its own to show its spike and adoption."""
    return [f"--out_dir={out}", f"--growth_init={init}", "--grow_after=0", "--replan=false",
            f"--total_tokens={args.total_tokens}", f"--seed={seed}", "--eval_interval=5", "--eval_batches=4",
            "--log_interval=1000000", "--sample_tokens=0", *shlex.split(args.train_args)]


def bench_growth(args):
    rows = []
    for init in args.inits.split(","):  # every init's settings and folders checked before the first run trains
        try:
            train.setup(growth_flags(init, 0, Path(args.out_dir) / "unused", args))
        except SettingError as err:
            raise SettingError(f"the {init} growth run: {err}") from None
        for seed in [int(x) for x in args.seeds.split(",")]:
            out = Path(args.out_dir) / f"growth-{init}-seed{seed}"
            why = run_folder_problem(out)
            require(not why, "--out_dir", args.out_dir, f"a folder whose run folders bench.py may make: {out} {why}")
    for seed in [int(x) for x in args.seeds.split(",")]:
        for init in args.inits.split(","):
            out = Path(args.out_dir) / f"growth-{init}-seed{seed}"
            clear_run_folder(out)
            start = time.time()
            train.run(growth_flags(init, seed, out, args))
            records = runs.read_metrics(out)
            rows.append(growth_row(records, init, seed, time.time() - start))
    return rows


def growth_row(records, init, seed, seconds):
    """Spike, recovery and adoption at each growth, from one run's metrics.jsonl."""
    evals = [r for r in records if r["kind"] == "eval"]
    steps = [r for r in records if r["kind"] == "step"]
    events = []
    for g in (r for r in records if r["kind"] == "growth"):
        before = [e["val_loss"] for e in evals if e["step"] == g["step"]][-1]  # the stage-end eval
        back = next((e["step"] for e in evals if e["step"] > g["step"] and e["val_loss"] <= before), None)
        fair = (g["experts"] - g["experts_from"]) / g["experts"]  # the new experts' share at balance
        adopted = next((r["step"] for r in steps if r["step"] > g["step"] and r["new_share"] >= fair / 2), None)
        events.append(dict(step=g["step"], experts=f"{g['experts_from']}->{g['experts']}", before=before,
                           after=g["val_loss"], spike=g["val_loss"] - before,
                           steps_to_recover=None if back is None else back - g["step"],
                           steps_to_adopt=None if adopted is None else adopted - g["step"]))
    return dict(init=init, seed=seed, events=events, final_val_loss=evals[-1]["val_loss"], seconds=seconds)


def print_growth(rows, args):
    print(f"growth: {args.total_tokens:,} tokens, train.py flags: {args.train_args or '(defaults)'}; "
          f"{machine(torch.device('cpu'))}, torch {torch.__version__}")
    print(f"{'init':>8} {'seed':>4} {'growth':>7} {'step':>5} {'val before':>10} {'after':>7} {'spike':>8} "
          f"{'steps to recover':>16} {'steps to adopt':>14}")
    fmt = lambda v: "never" if v is None else str(v)
    for r in rows:
        for e in r["events"]:
            print(f"{r['init']:>8} {r['seed']:>4} {e['experts']:>7} {e['step']:>5} {e['before']:>10.4f} "
                  f"{e['after']:>7.4f} {e['spike']:>+8.4f} {fmt(e['steps_to_recover']):>16} "
                  f"{fmt(e['steps_to_adopt']):>14}")
    print("final val loss: " + ", ".join(f"{r['init']} (seed {r['seed']}) {r['final_val_loss']:.4f}" for r in rows))
    print("recover: first eval (every 5 steps) at or below the pre-growth val loss; adopt: first step the new "
          "experts get half their balanced share of tokens")


def bench_step(args):
    """train.py's step (forward, backward, clipping, AdamW, balancing; timed_step) for each E."""
    argv = shlex.split(args.train_args)
    rows = [step_row(argv, int(E), args.repeats) for E in args.experts.split(",")]
    for r in rows:
        r["step_time_ratio"] = r["step_seconds"] / rows[0]["step_seconds"]
    rho = plan.step_time_exponent([r["experts"] for r in rows], [r["step_seconds"] for r in rows]) \
        if len(rows) > 1 else None
    s, model_settings, _ = train.parse(argv)
    return dict(rows=rows, step_time_exponent=rho, settings=dict(**vars(s), **model_settings),
                device=rows[0]["device"])


def timed_step(argv, n_experts):
    """train.py's model, optimizer and training step at E = n_experts: the settings, wrappers (dtype,
    compile) and step of a run with these flags, on random tokens (timing needs tokens, not text).
    Returns (raw model, optimizer, device, step) where step(i) takes one optimizer step on batch i."""
    s, model_settings, _ = train.parse(argv)
    train.size_for_corpus(model_settings, s.data)
    cfg = emo.Config(**{**model_settings, "n_experts": n_experts})
    train.validate(s, cfg, 1, 1)
    device = torch.device(runs.resolve_device(s.device))
    dtype = runs.autocast_dtype(s.dtype, device)
    torch.manual_seed(0)
    raw = emo.Transformer(cfg).to(device)
    optimizer = train.make_optimizer(raw, s, device)
    model = train.wrap(raw, s, device)

    def step(i):
        tokens = torch.randint(cfg.vocab_size, (s.batch_size, cfg.seq_len + 1), generator=torch.Generator().manual_seed(i))
        tokens = tokens.to(device)
        return train.train_step(model, optimizer, [(tokens[:, :-1], tokens[:, 1:])], s.lr, s.grad_clip, dtype)

    return raw, optimizer, device, step


def step_row(argv, n_experts, repeats):
    """One E: step time, the optimizer's share of it, peak and state memory, and one growth E -> 2E."""
    raw, optimizer, device, step = timed_step(argv, n_experts)
    for i in range(2):  # warm-up: first-call allocations, compilation, optimizer state
        step(i)
    tracked = report.reset_peak_memory(device)
    seconds = statistics.median(timed(lambda: step(i), device) for i in range(2, 2 + repeats))
    peak = report.peak_memory(device) if tracked else None
    tokens = raw.config.seq_len * train.parse(argv)[0].batch_size
    mfu = report.mfu(tokens / seconds, raw.config, device)
    # the optimizer step alone, on gradients of the size the training step leaves (zero_grad freed them)
    for p in raw.parameters():
        p.grad = torch.zeros_like(p)
    optimizer_seconds = statistics.median(timed(optimizer.step, device) for _ in range(repeats))
    optimizer.zero_grad(set_to_none=True)
    dtype = runs.autocast_dtype(train.parse(argv)[0].dtype, device)
    cast = statistics.median(expert_cast_seconds(raw, dtype, device) for _ in range(repeats)) if dtype else None
    state = report.state_memory(raw, optimizer)
    growth = timed(lambda: (emo.grow_experts(raw, 2 * n_experts, init="gaussian"),
                            emo.grow_optimizer(optimizer, "reset")), device)
    return dict(experts=n_experts, step_seconds=seconds, tokens_per_second=tokens / seconds, mfu=mfu,
                optimizer_seconds=optimizer_seconds, optimizer_share=optimizer_seconds / seconds, peak_memory=peak,
                state_memory=state, growth_seconds=growth, device=str(device), cast_seconds=cast,
                cast_share=None if cast is None else cast / seconds)


def expert_cast_seconds(raw, dtype, device):
    """What each micro-batch pays for MoE.dispatch's `w.to(dtype)`: every expert weight cast to the autocast
    dtype in the forward, and the gradient cast back in the backward."""
    weights = [w for moe in raw.moe_layers() for w in (moe.w_in, moe.w_out)]
    grads = [torch.ones_like(w, dtype=dtype) for w in weights]

    def cast():
        torch.autograd.backward([w.to(dtype) for w in weights], grads)

    seconds = timed(cast, device)
    for w in weights:
        w.grad = None
    return seconds


def print_step(result, args):
    device = torch.device(result["device"])
    print(f"training step vs E at fixed top-k; train.py flags: {args.train_args or '(defaults)'}; {machine(device)}, "
          f"torch {torch.__version__}; median of {args.repeats} steps")
    print(f"{'E':>5} {'step ms':>9} {'vs first':>9} {'tok/s':>9} {'MFU':>6} {'optimizer ms':>13} {'share':>6} "
          f"{'peak MB':>8} {'state MB':>9} {'grow E->2E ms':>14} {'cast ms':>8} {'share':>6}")
    for r in result["rows"]:
        peak = "-" if r["peak_memory"] is None else f"{r['peak_memory'] / 2**20:,.0f}"
        print(f"{r['experts']:>5} {r['step_seconds'] * 1e3:>9.1f} {r['step_time_ratio']:>8.3f}x "
              f"{r['tokens_per_second']:>9,.0f} {percent(r['mfu']):>6} {r['optimizer_seconds'] * 1e3:>13.1f} {r['optimizer_share']:>6.1%} "
              f"{peak:>8} {r['state_memory'] / 2**20:>9,.1f} {r['growth_seconds'] * 1e3:>14.1f} "
              + ("       -      -" if r["cast_seconds"] is None else
                 f"{r['cast_seconds'] * 1e3:>8.1f} {r['cast_share']:>6.1%}"))
    rows = result["rows"]
    if result["step_time_exponent"] is not None:
        print(f"step time ~ E^{result['step_time_exponent']:.4f}: {rows[-1]['step_time_ratio']:.3f}x from "
              f"E={rows[0]['experts']} to {rows[-1]['experts']} (the paper, Fig. 1: 1.08x from 8 to 128 at ~1.1B "
              f"active, E^{plan.STEP_TIME_EXPONENT:.4f})")
    print("state: weights + gradients + AdamW moments; peak: " + ("CUDA allocator" if device.type == "cuda" else
          "the process's resident set (Python and torch included)") + "; grow: grow_experts + grow_optimizer; "
          "cast: the expert weights' cast to bf16 and its gradient's back, paid once per micro-batch")


# EMO-progressive's own recipe at each growth, as train.py flags: fresh Gaussian experts and router rows, the
# balancing bias and the optimizer state reset, the learning rate re-warmed; stage budgets from Table 3's law
PAPER_RECIPE = ("--grow_after=0", "--growth_init=gaussian", "--growth_optimizer=reset", "--rewarm_steps=20",
                "--replan=false")  # Table 3's split as the law plans it, fresh experts, reset moments, re-warm


def repro_arms(args):
    """{name: train.py flags}: fixed E_max, fixed E_max/2, the dense-equivalent fixed E = top_k (every routed
    expert active: the same compute per token, no spare capacity), progressive growth as train.py does it by
    default, and progressive growth with the paper's recipe."""
    experts = [int(E) for E in args.experts.split(",")]
    top_k = model_setting(args, "top_k")
    arms = {f"fixed-{E}": ["--schedule=fixed", f"--experts={E}"]
            for E in dict.fromkeys((experts[-1], experts[-1] // 2, top_k))}
    arms["progressive"] = ["--schedule=progressive", f"--experts={args.experts}"]
    arms["progressive-paper"] = ["--schedule=progressive", f"--experts={args.experts}", *PAPER_RECIPE]
    return arms


def arm_command(name, flags, seed, args):
    """(run folder, train.py command) of one arm and seed."""
    out = Path(args.out_dir) / f"{name}-seed{seed}"
    return out, [sys.executable, str(HERE / "train.py"), *flags, f"--seed={seed}",
                 f"--total_tokens={args.total_tokens}", "--sample_tokens=0", *shlex.split(args.train_args),
                 f"--out_dir={out}"]


def check_arms(arms, args):
    """Every arm's train.py settings, checked as train.py checks them, before the first arm trains: a bad
    arm is refused in one line, not after hours of the others."""
    for name, flags in arms.items():
        try:
            train.setup(arm_command(name, flags, 0, args)[1][2:])
        except SettingError as err:
            raise SettingError(f"the {name} arm: {err}") from None
        for seed in [int(x) for x in args.seeds.split(",")]:
            out, command = arm_command(name, flags, seed, args)
            why = None if finished(out, command) else run_folder_problem(out)
            require(not why, "--out_dir", args.out_dir, f"a folder whose run folders bench.py may make: {out} {why}")


def run_arm(name, flags, seed, args):
    """One arm's train.py run for one seed as its own process (a clean process: fair time and memory), in
    out_dir/name-seedS; a folder that already holds a finished run of the same command is reused."""
    out, command = arm_command(name, flags, seed, args)
    if not finished(out, command):
        clear_run_folder(out)
        print(f"running {name} seed {seed}: {shlex.join(command[1:])}", file=sys.stderr)
        with open(out / "train.log", "w") as log:
            if subprocess.run(command, stdout=log, stderr=subprocess.STDOUT).returncode:
                sys.exit(f"bench.py: {name} seed {seed} failed: see {out / 'train.log'}")
        (out / "command.json").write_text(json.dumps(command))
    return out


def bench_repro(args):
    rows, folders = [], {}
    check_arms(repro_arms(args), args)
    for seed in [int(x) for x in args.seeds.split(",")]:
        for name, flags in repro_arms(args).items():
            out = run_arm(name, flags, seed, args)
            rows.append(repro_row(name, seed, out))
            folders.setdefault(name, []).append(out)
    plot = report.plot_losses(folders, Path(args.out_dir) / "curves.png",
                             title="validation bits per byte, every arm and seed (dotted: growth)")
    return dict(runs=rows, arms=repro_summary(rows), plots=[plot])


def finished(out, command):
    """Does `out` hold a finished run (command.json is written last) with these train.py settings? Compared
    as the run wrote them down (its config.json), not as spelled: flags in another order, another path to the
    same --config, or the same run copied from another bench's folder count as the same run."""
    try:
        json.loads((out / "command.json").read_text())
        done = json.loads((out / "config.json").read_text())
    except (OSError, ValueError):
        return False
    return isinstance(done, dict) and run_identity(done["settings"], done["model"]) == run_identity(*train_config(command))


def train_config(command):
    """(settings, model) of a train.py command as its config.json writes them (JSON: tuples are lists)."""
    s, model, _ = train.parse(command[2:])
    return json.loads(json.dumps(asdict(s))), json.loads(json.dumps({**asdict(emo.Config()), **model}))


def run_identity(settings, model):
    """What makes two runs the same run: every setting but where it is written and which file gave it
    (n_experts is the schedule's, which the settings give)."""
    ignored = ("out_dir", "config", "resume")
    return {k: v for k, v in settings.items() if k not in ignored}, {k: v for k, v in model.items() if k != "n_experts"}


def repro_row(name, seed, out):
    """One run's results from its metrics.jsonl: final losses, the val-loss curve, growth events, balance,
    time and the per-stage costs."""
    records = runs.read_metrics(out)
    final = [r for r in records if r["kind"] == "eval"][-1]
    stages = [r for r in records if r["kind"] == "stage"]
    cv = [r["load_cv"] for r in records if r["kind"] == "step"]
    curve = {r["step"]: r["val_loss"] for r in records if r["kind"] == "eval"}
    growths = growth_row(records, name, seed, None)["events"]  # spike and adoption at each growth
    return dict(arm=name, seed=seed, val_loss=final["val_loss"], val_bpb=final.get("val_bpb"),
                per_domain=final["val_loss_per_domain"],
                curve=curve, growths=growths, load_cv_first_tenth=statistics.mean(cv[:len(cv) // 10 or 1]),
                load_cv_last_tenth=statistics.mean(cv[-(len(cv) // 10 or 1):]),
                train_seconds=sum(st["train_seconds"] for st in stages), wall_seconds=stages[-1]["seconds"],
                stages=[{k: st[k] for k in ("experts", "tokens", "tokens_per_second", "peak_memory", "state_memory")}
                        for st in stages])


def repro_summary(rows):
    """Per arm, over seeds: mean and range of the final loss; its difference to fixed E_max seed by seed
    (the same seed shares data order and initial weights): the mean, the spread (max - min) and their
    ratio, which says whether the difference is real; time ratio; per stage mean tokens/s and memory."""
    arms = list(dict.fromkeys(r["arm"] for r in rows))
    base = {r["seed"]: r for r in rows if r["arm"] == arms[0]}
    common_steps = sorted(set.intersection(*(set(r["curve"]) for r in rows)))  # evals every arm made
    mean, summary = statistics.mean, []
    for arm in arms:
        runs = [r for r in rows if r["arm"] == arm]
        first_stage_ratio = lambda key: mean([r["stages"][0][key] / base[r["seed"]]["stages"][0][key] for r in runs])
        stages = [{k: mean([run["stages"][i][k] or 0 for run in runs]) for k in runs[0]["stages"][i]}
                  for i in range(len(runs[0]["stages"]))]
        diffs = [r["val_loss"] - base[r["seed"]]["val_loss"] for r in runs]
        spread = max(diffs) - min(diffs)
        summary.append(dict(
            arm=arm, seeds=len(runs), val_loss=mean([r["val_loss"] for r in runs]),
            val_bpb=mean([r["val_bpb"] for r in runs]) if all(r.get("val_bpb") for r in runs) else None,
            curve={step: mean([r["curve"][step] for r in runs]) for step in common_steps},
            val_loss_min=min(r["val_loss"] for r in runs), val_loss_max=max(r["val_loss"] for r in runs),
            diff=mean(diffs), diff_min=min(diffs), diff_max=max(diffs),
            diff_to_spread=abs(mean(diffs)) / spread if spread > 0 else None,
            gap=mean([r["val_loss"] / base[r["seed"]]["val_loss"] - 1 for r in runs]),
            time_ratio=mean([r["train_seconds"] / base[r["seed"]]["train_seconds"] for r in runs]),
            first_stage_memory_ratio=first_stage_ratio("peak_memory") if stages[0]["peak_memory"] else None,
            first_stage_state_ratio=first_stage_ratio("state_memory"),
            stages=stages))
    return summary


def print_repro(result, args):
    on_gpu = runs.resolve_device(train.parse(shlex.split(args.train_args))[0].device).startswith("cuda")
    print(f"repro: {args.total_tokens:,.0f} tokens per run, stages up to E={args.experts.split(',')[-1]}, "
          f"train.py flags: {args.train_args or '(defaults)'}; {machine(torch.device('cuda' if on_gpu else 'cpu'))}, "
          f"torch {torch.__version__}")
    domains = list(result["runs"][0]["per_domain"])
    print(f"{'arm':>20} {'seed':>4} {'val loss':>8} {'bpb':>6} " + " ".join(f"{d:>7}" for d in domains)
          + f" {'train s':>8} {'wall s':>7} {'load CV first/last 10%':>23}")
    for r in result["runs"]:
        print(f"{r['arm']:>20} {r['seed']:>4} {r['val_loss']:>8.4f} {r['val_bpb'] or 0:>6.4f} "
              + " ".join(f"{r['per_domain'][d]:>7.3f}" for d in domains)
              + f" {r['train_seconds']:>8.0f} {r['wall_seconds']:>7.0f} "
              f"{r['load_cv_first_tenth']:>15.2f} / {r['load_cv_last_tenth']:.2f}")
    base = result["arms"][0]["arm"]
    print(f"\n{'arm':>20} {'val loss (min-max)':>25} {'bpb':>6} {'- ' + base + ' seed by seed':>32} {'/spread':>8} "
          f"{'train time':>11} {'stage-1 state':>13} {'stage-1 peak':>12}")
    for a in result["arms"]:
        peak = "-" if a["first_stage_memory_ratio"] is None else f"{a['first_stage_memory_ratio']:.2f}x"
        ratio = "-" if a["diff_to_spread"] is None else f"{a['diff_to_spread']:.1f}"
        print(f"{a['arm']:>20} {a['val_loss']:>8.4f} ({a['val_loss_min']:.4f}-{a['val_loss_max']:.4f}) "
              f"{a['val_bpb'] or 0:>6.4f} {a['diff']:>+9.4f} ({a['diff_min']:+.4f}..{a['diff_max']:+.4f}, "
              f"{a['gap']:+.2%}) {ratio:>8} {a['time_ratio']:>10.3f}x {a['first_stage_state_ratio']:>12.2f}x {peak:>12}")
    steps = list(result["arms"][0]["curve"])
    print(f"\n{'val loss at step':>20} " + " ".join(f"{s:>6}" for s in steps) + "   (means over seeds)")
    for a in result["arms"]:
        print(f"{a['arm']:>20} " + " ".join(f"{a['curve'][s]:>6.3f}" for s in steps))
    print(f"\n{'arm':>20} per stage (means over seeds): E tokens/s | peak MB | weights+grads+Adam MB")
    for a in result["arms"]:
        print(f"{a['arm']:>20} " + "  ".join(f"E={st['experts']:.0f} {st['tokens_per_second']:,.0f} | "
                                             f"{st['peak_memory'] / 2**20:,.0f} | {st['state_memory'] / 2**20:,.0f}"
                                             for st in a["stages"]))
    print(f"\n{'arm':>20} {'seed':>4} at each growth: E, val-loss spike, steps until the new experts get half their "
          "balanced share")
    for r in (r for r in result["runs"] if r["growths"]):
        print(f"{r['arm']:>20} {r['seed']:>4} " + "  ".join(f"{g['experts']} {g['spike']:+.3f} {g['steps_to_adopt']}"
                                                          for g in r["growths"]))
    print("seed by seed: each arm's final val loss minus the first arm's with the same seed (mean, min..max, and as "
          "a ratio); /spread: |mean| over (max - min) of those differences, the effect in units of its noise")
    print("train time: the sum of training steps (no evals, growth or checkpoints), as a ratio to the first arm's "
          "run of the same seed; peak: " + ("CUDA allocator" if on_gpu else
                                          "the process's resident set (Python and torch included)"))
    for line in result["plots"]:
        print(line)


# ---------------------------------------------------------------------------------------------
# bench.py frontier: EMO-modular's memory-accuracy picture
# ---------------------------------------------------------------------------------------------

FRONTIER_KEEP = (1.0, 0.5, 0.25, 0.125)  # shares of each layer's experts kept (the paper: 128/64/32/16 of 128)
FRONTIER_TRAINED = "0.5,0.25,0.125"  # the pruned sizes a model may be trained at from scratch (--trained_at)
# the paper's recipe (EMO-modular sec. 3, at emo's size) as flags over configs/modular.json
PAPER_MODULAR = ("--router=softmax", "--lb_coef=0.1", "--z_coef=0.001", "--lb_window=1",
                 "--pool_size_range=0.0625,1.0", "--doc_attention=true")


def recipe_is_papers():
    """Does configs/modular.json train exactly the paper's recipe (PAPER_MODULAR)?"""
    recipe = f"--config={HERE / 'configs' / 'modular.json'}"
    (s, model, _), (paper_s, paper_model, _) = train.parse([recipe]), train.parse([recipe, *PAPER_MODULAR])
    return s == paper_s and emo.Config(**model) == emo.Config(**paper_model)


def frontier_arms(args):
    """{name: (train.py flags, share)}, all on configs/modular.json's recipe (softmax router and its
    balancing, document attention). share None: a standard MoE (pools off), EMO-modular (pools on) and modular
    with progressive growth, all ending at E_max, to be pruned to every share (and EMO-modular with the
    paper's recipe, where configs/modular.json's differs from it). share s (each of --trained_at), pools off,
    trained from scratch to match the model pruned to s: "trained-En" with its shape (n = s * E_max experts, top-k:
    the same memory and compute per token), and "dense-n" with the same parameters all active (E = top_k
    routed experts and enough shared ones that the feed-forward width matches)."""
    E = int(args.experts.split(",")[-1])
    top_k, shared = model_setting(args, "top_k"), model_setting(args, "n_shared")
    recipe, no_pools = f"--config={HERE / 'configs' / 'modular.json'}", "--pool_size_range=none"
    arms = {"standard": ([recipe, no_pools, "--schedule=fixed", f"--experts={E}"], None),
            "modular": ([recipe, "--schedule=fixed", f"--experts={E}"], None),
            "modular-progressive": ([recipe, f"--experts={args.experts}"], None)}
    if not recipe_is_papers():  # the paper's own recipe beside emo's, one flag set away
        arms["modular-paper"] = ([recipe, *PAPER_MODULAR, "--schedule=fixed", f"--experts={E}"], None)
    for share in (float(x) for x in args.trained_at.split(",")):
        n = round(share * E)
        if n >= top_k:  # a model needs top_k experts to train
            arms[f"trained-E{n}"] = ([recipe, no_pools, "--schedule=fixed", f"--experts={n}"], share)
        if n > top_k:
            arms[f"dense-{n}"] = ([recipe, no_pools, "--schedule=fixed", f"--experts={top_k}",
                                   f"--n_shared={shared + n - top_k}"], share)
    return arms


def bench_frontier(args):
    """Train every arm for every seed, then prune the E_max arms per domain (eval.py's selection) at each
    share kept and measure each domain's validation bits per byte; the arms trained at a pruned size are
    measured whole. Returns the rows, a summary per arm and share, and frontier.png."""
    rows = []
    check_arms({name: flags for name, (flags, _) in frontier_arms(args).items()}, args)
    for seed in [int(x) for x in args.seeds.split(",")]:
        for name, (flags, share) in frontier_arms(args).items():
            out = run_arm(name, flags, seed, args)
            rows += frontier_rows(name, seed, out, FRONTIER_KEEP if share is None else (1.0,), share)
    summary = frontier_summary(rows)
    return dict(runs=rows, arms=summary, plots=[plot_frontier(summary, rows, Path(args.out_dir) / "frontier.png")])


def frontier_rows(name, seed, out, shares, matches=None, routing=None):
    """One run's model pruned per domain at each share: the mean of the domains' bits per byte (each domain
    counts once, as tasks do), each domain's, and the parameters kept. matches: the share of E_max a model
    trained at a pruned size stands for (its row's keep). routing: Config settings for evaluation (default:
    over all experts, no pools)."""
    state, path = runs.load_checkpoint(out, settings_type=train.Settings)
    model = runs.model_from_checkpoint(state, path, **(routing or dict(pool_size=None, pool_size_range=None))).eval()
    data = state["settings"]["data"]
    results, sizes = evaluate.evaluate_subsets(model, Corpus(data, "train"), Corpus(data, "val"), shares,
                                              calib_rows=8, eval_rows=64)
    return [dict(arm=name, seed=seed, keep=matches or share, params=sizes[share],
                 per_domain={d: r[share]["bpb"] for d, r in results.items()},
                 bpb=statistics.mean(r[share]["bpb"] for r in results.values())) for share in shares]


def frontier_summary(rows):
    """Per arm and share: mean bits per byte over seeds, its range, parameters; for every arm but the
    standard MoE, its difference to the standard MoE pruned to the same share, seed by seed (spread:
    max - min of those differences)."""
    summary = []
    for arm, keep in dict.fromkeys((r["arm"], r["keep"]) for r in rows):
        runs = [r for r in rows if (r["arm"], r["keep"]) == (arm, keep)]
        same_size = {r["seed"]: r["bpb"] for r in rows if r["arm"] == "standard" and r["keep"] == keep}
        diffs = [r["bpb"] - same_size[r["seed"]] for r in runs if r["seed"] in same_size] if arm != "standard" else []
        summary.append(dict(arm=arm, keep=keep, params=runs[0]["params"], seeds=len(runs),
                            bpb=statistics.mean(r["bpb"] for r in runs), bpb_min=min(r["bpb"] for r in runs),
                            bpb_max=max(r["bpb"] for r in runs),
                            diff=statistics.mean(diffs) if diffs else None,
                            diff_spread=max(diffs) - min(diffs) if diffs else None))
    return summary


def plot_frontier(summary, rows, png):
    plt = report.pyplot()
    if plt is None:
        return f"no {png}: matplotlib is not installed (optional: pip install matplotlib)"
    fig, ax = plt.subplots(figsize=(7, 4.5))
    labels = {"standard": "standard MoE, pruned per domain", "modular": "EMO-modular, pruned per domain",
              "modular-progressive": "modular + progressive, pruned per domain",
              "modular-paper": "EMO-modular with the paper's recipe, pruned per domain",
              "trained-E": "MoE trained at that size (its shape)", "dense-": "dense trained at that size"}
    for i, (arm, label) in enumerate(labels.items()):
        family = lambda name: name == arm or (arm.endswith(("-E", "-")) and name.startswith(arm))
        points = sorted((a["params"] / 1e6, a["bpb"]) for a in summary if family(a["arm"]))
        seeds = [(r["params"] / 1e6, r["bpb"]) for r in rows if family(r["arm"])]
        if not points:
            continue
        ax.plot(*zip(*points), marker="o", color=f"C{i}", label=label)
        ax.scatter(*zip(*seeds), s=10, color=f"C{i}", alpha=0.5)
    ax.set(xlabel="parameters kept (M)", ylabel="validation bits per byte (mean over domains)",
           title="memory vs accuracy: experts kept 100 / 50 / 25 / 12.5 % (dots: seeds)")
    ax.legend()
    fig.savefig(png, dpi=100, bbox_inches="tight")
    plt.close(fig)
    return f"wrote {png}"


def print_frontier(result, args):
    print(f"frontier: {args.total_tokens:,} tokens per run, E up to {args.experts.split(',')[-1]}, recipe "
          f"configs/modular.json, train.py flags: {args.train_args or '(defaults)'}; "
          f"{machine(torch.device('cpu'))}, torch {torch.__version__}")
    print(f"{'arm':>20} {'keep':>6} {'params M':>9} {'bpb (min-max)':>24} {'- standard, seed by seed':>26}")
    for a in result["arms"]:
        diff = "" if a["diff"] is None else f"{a['diff']:+.4f} (spread {a['diff_spread']:.4f})"
        print(f"{a['arm']:>20} {a['keep']:>6.1%} {a['params'] / 1e6:>9.3f} {a['bpb']:>8.4f} "
              f"({a['bpb_min']:.4f}-{a['bpb_max']:.4f}) {diff:>26}")
    print("bpb: validation bits per byte, the mean of the domains' (each domain's experts chosen from 8 of its "
          "training windows, measured on 64 of its validation windows); seed by seed: minus the standard MoE "
          "pruned to the same size (same seed)")
    for line in result["plots"]:
        print(line)


# ---------------------------------------------------------------------------------------------
# bench.py modular: where EMO-modular's gaps to a standard MoE and to a model trained at the pruned size come from
# ---------------------------------------------------------------------------------------------

# each lead: the flags it changes from the paper's recipe, for the standard MoE and EMO-modular alike
MODULAR_LEADS = {"paper": (), "window": ("--lb_window=100",), "floor": ("--pool_size_range=0.25,1.0",),
                 "sigmoid": ("--router=sigmoid",), "sigmoid-floor": ("--router=sigmoid", "--pool_size_range=0.25,1.0"),
                 "fine": ("--experts=128", "--top_k=8", "--d_expert=16")}
MODULAR_KEEP = 0.25  # the share of experts the subsets keep (the paper's 32 of 128)
SMALLEST_KEEP = 0.125  # the smallest subset the frontier measures: what a pool floor above it may cost
# evaluation inside document pools as training routes, but fair for a loss: each token's pool from its
# document's tokens so far, half the experts (training draws pool sizes from 6.25 to 100 %)
CAUSAL_POOLS = dict(pool_size=0.5, pool_size_range=None, pool_causal=True)


def modular_arms(args):
    """{lead: {role: (run name, train.py flags)}} for the leads asked for. Roles: "standard" (no pools),
    "modular" (pools), "trained" (no pools, MODULAR_KEEP of the experts: the pruned subset's shape, trained from
    scratch). The runs without pools are named by the lead whose flags they share: a lead that changes the
    pools and something else (sigmoid-floor) reuses the standard and trained runs of the lead without the pool
    change (sigmoid), one that changes only the pools reuses the paper's."""
    recipe, no_pools = f"--config={HERE / 'configs' / 'modular.json'}", "--pool_size_range=none"
    arms = {}
    for lead in args.leads.split(","):
        flags = [f for f in MODULAR_LEADS[lead] if not f.startswith("--experts=")]
        E = next((int(f.split("=")[1]) for f in MODULAR_LEADS[lead] if f.startswith("--experts=")), 32)
        unpooled = tuple(f for f in MODULAR_LEADS[lead] if not f.startswith("--pool_size"))
        base = next((name for name, changes in MODULAR_LEADS.items() if changes == unpooled), lead)
        no_pool_flags = [f for f in unpooled if not f.startswith("--experts=")]
        arms[lead] = {
            "standard": (f"standard-{base}", [recipe, *PAPER_MODULAR, *no_pool_flags, no_pools,
                                              "--schedule=fixed", f"--experts={E}"]),
            "modular": (f"modular-{lead}", [recipe, *PAPER_MODULAR, *flags, "--schedule=fixed", f"--experts={E}"]),
            "trained": (f"trained-{base}", [recipe, *PAPER_MODULAR, *no_pool_flags, no_pools,
                                            "--schedule=fixed", f"--experts={round(MODULAR_KEEP * E)}"])}
    return arms


def bench_modular(args):
    """Train every lead's three roles for every seed; measure the standard MoE whole, EMO-modular whole and
    pruned per domain to MODULAR_KEEP (eval.py's selection), the trained-at-size MoE whole. Returns the runs
    and, per lead, the two gaps seed by seed: modular - standard (whole models) and pruned modular - trained."""
    arms = modular_arms(args)
    check_arms({name: flags for roles in arms.values() for name, flags in roles.values()}, args)
    measured, routing = {}, {}
    for seed in [int(x) for x in args.seeds.split(",")]:
        for roles in arms.values():
            for role, (name, flags) in roles.items():
                if (name, seed) not in measured:
                    shares = (1.0, MODULAR_KEEP, SMALLEST_KEEP) if role == "modular" else (1.0,)
                    out = run_arm(name, flags, seed, args)
                    measured[name, seed] = frontier_rows(name, seed, out, shares)
                    if role != "trained":
                        routing[name, seed] = routing_of(out)
                    if role == "modular":  # the routing it trained with: pools, here causal, of half the experts
                        row, = frontier_rows(name, seed, out, (1.0,), routing=CAUSAL_POOLS)
                        measured[name, seed].append(row | dict(keep="causal"))
    bpb = {(name, seed, r["keep"]): r["bpb"] for (name, seed), rows in measured.items() for r in rows}
    seeds = sorted({seed for _, seed in measured})
    # the baselines at their own best: the standard and the trained-at-size run of whichever lead is lowest on
    # average, so that no gap closes by making a baseline worse
    best = {role: min((roles[role][0] for roles in arms.values()),
                      key=lambda name: statistics.mean(bpb[name, s, 1.0] for s in seeds)) for role in ("standard", "trained")}
    leads = []
    for lead, roles in arms.items():
        (std, _), (mod, _), (trained, _) = roles["standard"], roles["modular"], roles["trained"]
        full = [bpb[mod, s, 1.0] - bpb[std, s, 1.0] for s in seeds]
        pruned = [bpb[mod, s, MODULAR_KEEP] - bpb[trained, s, 1.0] for s in seeds]
        nmi = {f"{role}_{labels}": [statistics.mean(r["nmi"] for r in routing[name, s][labels]) for s in seeds]
               for role, name in (("standard", std), ("modular", mod)) for labels in ("domain", "surface")}
        leads.append(dict(lead=lead, flags=list(MODULAR_LEADS[lead]), seeds=seeds,
                          standard=[bpb[std, s, 1.0] for s in seeds], modular=[bpb[mod, s, 1.0] for s in seeds],
                          full_gap=full, pruned_gap=pruned, nmi=nmi,
                          smallest=[bpb[mod, s, SMALLEST_KEEP] for s in seeds],
                          full_gap_best=[bpb[mod, s, 1.0] - bpb[best["standard"], s, 1.0] for s in seeds],
                          pruned_gap_best=[bpb[mod, s, MODULAR_KEEP] - bpb[best["trained"], s, 1.0] for s in seeds],
                          causal_gap=[bpb[mod, s, "causal"] - bpb[std, s, 1.0] for s in seeds]))
    first = min(seed for _, seed in routing)
    paper = arms[next(iter(arms))]
    pictures = {role: routing[paper[role][0], first] for role in ("standard", "modular")}
    return dict(runs=[r | dict(arm=name, seed=seed) for (name, seed), rows in measured.items() for r in rows],
                leads=leads, best=best, routing={f"{name}-seed{seed}": r for (name, seed), r in routing.items()},
                plots=[plot_specialization(pictures, Path(args.out_dir) / "specialization.png", first)])


def routing_of(out):
    """A run's routing specialization (eval.specialization: per layer, by domain and by token class) on 64
    validation windows of each domain, routed over all experts."""
    state, path = runs.load_checkpoint(out, settings_type=train.Settings)
    model = runs.model_from_checkpoint(state, path, pool_size=None, pool_size_range=None).eval()
    return evaluate.specialization(model, Corpus(state["settings"]["data"], "val"), 64)


def plot_specialization(pictures, png, seed):
    """Each domain's share of its (token, slot) assignments per expert, in every layer, for the standard MoE
    (top) and EMO-modular (bottom): a specialised expert is a bright cell alone in its column."""
    plt = report.pyplot()
    if plt is None:
        return f"no {png}: matplotlib is not installed (optional: pip install matplotlib)"
    roles = list(pictures)
    layers = len(pictures[roles[0]]["domain"])
    fig, axes = plt.subplots(len(roles), layers, figsize=(3.2 * layers, 1.6 * len(roles) + 0.6), squeeze=False)
    for row, role in enumerate(roles):
        for layer, r in enumerate(pictures[role]["domain"]):
            ax = axes[row][layer]
            ax.imshow(r["share"], aspect="auto", cmap="viridis", vmin=0)
            ax.set_title(f"{role}, layer {layer}: NMI {r['nmi']:.2f}", fontsize=8)
            ax.set_yticks(range(len(r["share"])))
            ax.set_yticklabels(pictures[role]["domains"], fontsize=7)
            ax.set_xticks([])
    fig.supxlabel(f"experts (seed {seed}); colour: a domain's share of its assignments", fontsize=8)
    fig.savefig(png, dpi=100, bbox_inches="tight")
    plt.close(fig)
    return f"wrote {png}"


def spread(values):
    return f"{statistics.mean(values):+.4f} ({min(values):+.4f}..{max(values):+.4f})"


def print_modular(result, args):
    print(f"modular: {args.total_tokens:,} tokens per run, configs/modular.json with the paper's recipe "
          f"({' '.join(PAPER_MODULAR)}) and each lead's change; train.py flags: {args.train_args or '(none)'}; "
          f"{machine(torch.device('cpu'))}, torch {torch.__version__}")
    print(f"{'lead':>13} {'flags':>44} {'standard bpb':>13} {'modular - standard':>28} {'in causal pools':>28} "
          f"{'pruned to ' + format(MODULAR_KEEP, '.0%') + ' - trained at that size':>40} "
          f"{'modular pruned to ' + format(SMALLEST_KEEP, '.1%'):>26}")
    for lead in result["leads"]:
        print(f"{lead['lead']:>13} {' '.join(lead['flags']) or '(the paper)':>44} "
              f"{statistics.mean(lead['standard']):>13.4f} {spread(lead['full_gap']):>28} "
              f"{spread(lead['causal_gap']):>28} {spread(lead['pruned_gap']):>40} "
              f"{statistics.mean(lead['smallest']):>26.4f}")
    print(f"\nagainst the best baselines measured here (lowest mean): standard {result['best']['standard']}, trained at "
          f"the subset's size {result['best']['trained']}")
    print(f"{'lead':>13} {'modular - best standard':>28} {'pruned - best trained':>28}")
    for lead in result["leads"]:
        print(f"{lead['lead']:>13} {spread(lead['full_gap_best']):>28} {spread(lead['pruned_gap_best']):>28}")
    print("bpb: validation bits per byte, the mean of the domains' (64 validation windows each); gaps seed by seed: "
          "mean (min..max) over seeds; in causal pools: the modular model routed inside pools of half its experts, "
          "each token's from its document's tokens so far; pruned: each domain's experts chosen from 8 of its "
          "training windows")
    print(f"\n{'lead':>13} how much the chosen experts reveal a token's domain / its surface form (I(label; expert) / "
          "H(label), mean over layers and seeds)")
    print(f"{'':>13} {'standard: domain':>17} {'surface':>8} {'modular: domain':>16} {'surface':>8}")
    for lead in result["leads"]:
        nmi = {k: statistics.mean(v) for k, v in lead["nmi"].items()}
        print(f"{lead['lead']:>13} {nmi['standard_domain']:>17.3f} {nmi['standard_surface']:>8.3f} "
              f"{nmi['modular_domain']:>16.3f} {nmi['modular_surface']:>8.3f}")
    for line in result["plots"]:
        print(line)


# ---------------------------------------------------------------------------------------------
# bench.py gpu: every CUDA path in one command (on a CPU: the part a CPU can check, the rest named)
# ---------------------------------------------------------------------------------------------

BF16_TOLERANCE = 3e-2  # ||bf16 - fp32 reference|| / ||fp32 reference||, for outputs and every gradient
COMPILED_REPEAT = 5e-3  # relative loss difference allowed between two compiled bf16 runs of the same steps
CPU_RUN = ["--n_layer=1", "--d_model=64", "--n_head=4", "--d_expert=32", "--seq_len=32", "--batch_size=8",
           "--total_tokens=9216", "--stages=2:0.34,4:0.33,8:0.33", "--warmup_steps=3", "--rewarm_steps=3"]
GPU_RUN = ["--n_layer=2", "--d_model=256", "--n_head=4", "--d_expert=128", "--top_k=4", "--seq_len=256",
           "--batch_size=32", "--total_tokens=1228800", "--stages=8:0.34,16:0.33,32:0.33", "--warmup_steps=20",
           "--rewarm_steps=10"]
GPU_SIZE = dict(d_model=768, d_expert=384, top_k=8, n_head=12, n_layer=4, seq_len=1024, batch_size=16,
                vocab_size=50304)  # the GPU recipes' width and vocabulary, so step time, MFU and memory are theirs
CUDA_ONLY = ["torchrun with NCCL, DDP and FSDP2 (2 GPUs where there are)", "bench moe at d_model 768, d_expert 384, top-8, "
             "E 8..128 (bf16, compiled)", "bench step at the same size, 4 layers, V 50304 (bf16, compiled)"]


def bench_gpu(args):
    """Each check appends to report["checks"] ({check, ok, detail, ...}); gpu.json is rewritten after every
    section, so a run cut short still leaves what it measured."""
    device = torch.device(args.device)
    cuda = device.type == "cuda"
    out = Path(args.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    report = dict(machine=machine(device), torch=torch.__version__, checks=[],
                  skipped=[] if cuda else [f"{name}: needs CUDA" for name in CUDA_ONLY])
    sections = [dispatch_numerics, empty_experts, compiled_run, compiled_modular_run] + \
        ([torchrun_nccl, gpu_moe, gpu_step] if cuda else [])
    for section in sections:
        start = time.time()
        section(args, device, report)
        print(f"{section.__name__}: {time.time() - start:.0f} s", file=sys.stderr)
        (out / "gpu.json").write_text(strict_json(report))
    report["ok"] = all(c["ok"] for c in report["checks"])
    (out / "gpu.json").write_text(strict_json(report))
    return report


def output_and_gradients(moe, x, seg, weights, path):
    """The layer's output [N, d] and the gradients of a fixed projection of it (plus the auxiliary losses)
    with respect to x and every parameter, along one path: reference (fp32), grouped or loop (bf16)."""
    x = x.detach().clone().requires_grad_()
    moe.zero_grad(set_to_none=True)
    if path == "reference":  # in fp32, each token routed alone within the experts its pool allows
        allowed = moe.allowed_experts(moe.router.logits(x), seg)
        y, aux = emo.reference_moe(moe, x, None if allowed is None else [set(row.nonzero().flatten().tolist())
                                                                        for row in allowed])
    else:
        moe.use_grouped_mm = path == "grouped"
        with torch.autocast(x.device.type, dtype=torch.bfloat16):
            y, aux = moe(x.unsqueeze(0), seg)
        moe.use_grouped_mm = True
        y = y.squeeze(0)
    ((y.float() * weights).sum() + aux[0] + aux[1]).backward()
    return {"output": y.detach().float(), "grad x": x.grad,
            **{f"grad {n}": p.grad.float() for n, p in moe.named_parameters()}}


def relative_error(a, b):
    return ((a - b).norm() / b.norm().clamp(min=1e-12)).item()


def dispatch_numerics(args, device, report):
    """bf16 grouped dispatch and the bf16 per-expert loop against the fp32 per-token reference: the output
    and every gradient, both routers, with and without document pools, before and after a growth."""
    grouped = emo.grouped_mm_supported(torch.empty(1, dtype=torch.bfloat16, device=device))
    for router in emo.ROUTERS:
        for pools in (False, True):
            torch.manual_seed(0)
            model = emo.Transformer(emo.Config(vocab_size=64, eot_id=63, n_layer=1, n_head=4, d_model=128,
                                               d_expert=64, n_experts=8, top_k=2, router=router,
                                               pool_size=4 if pools else None)).to(device).eval()
            ids = torch.randint(0, 63, (1, 128), device=device)
            ids[:, 15::16] = 63  # documents of 16 tokens
            seg = emo.document_segments(ids, 63) if pools else None
            x, weights = torch.randn(128, 128, device=device), torch.randn(128, 128, device=device)
            for when in ("before growth", "after growth 8->16"):
                if when != "before growth":
                    emo.grow_experts(model, 16)
                moe = model.blocks[0].moe
                reference = output_and_gradients(moe, x, seg, weights, "reference")
                errors = {f"{path} {name}": relative_error(value, reference[name])
                          for path in ("grouped", "loop")
                          for name, value in output_and_gradients(moe, x, seg, weights, path).items()}
                worst = max(errors, key=errors.get)
                report["checks"].append(dict(
                    check=f"bf16 dispatch = fp32 per-token reference: {router} router{', pools' if pools else ''}, "
                          f"{when}", ok=errors[worst] <= BF16_TOLERANCE, errors=errors,
                    detail=f"worst {worst} {errors[worst]:.1e} (tolerance {BF16_TOLERANCE:.0e}); grouped matmul "
                           + ("ran" if grouped else "not supported here: both paths looped")))


def empty_experts(args, device, report):
    """Reported broken in some torch/GPU combinations (pytorch issues 172439, 193633): an expert that gets
    no token must get exactly zero weight gradient, and the grouped matmul must never read rows past the
    last offset (here: NaN rows after it may not reach the output's valid rows or any gradient)."""
    torch.manual_seed(0)
    model = emo.Transformer(emo.Config(vocab_size=64, n_layer=1, n_head=4, d_model=128, d_expert=64,
                                       n_experts=8, top_k=2)).to(device)
    moe = model.blocks[0].moe
    emo.restrict_experts(model, [torch.arange(6)])  # experts 6 and 7 get no token
    x = torch.randn(1, 256, 128, device=device)
    for path in ("grouped", "loop"):
        moe.zero_grad(set_to_none=True)
        moe.use_grouped_mm = path == "grouped"
        with torch.autocast(device.type, dtype=torch.bfloat16):
            y, _ = moe(x)
        y.float().square().sum().backward()
        zero = all(bool((p.grad[6:] == 0).all()) for p in (moe.w_in, moe.w_out))
        used = all(bool((p.grad[:6] != 0).any()) for p in (moe.w_in, moe.w_out))
        report["checks"].append(dict(check=f"experts with no token get exactly zero weight gradient ({path}, bf16)",
                                     ok=zero and used, detail=f"idle experts exactly zero: {zero}; used ones "
                                     f"nonzero: {used}"))
    moe.use_grouped_mm = True
    if not emo.grouped_mm_supported(x.to(torch.bfloat16)):
        report["skipped"].append("rows past the last offset: no grouped matmul here")
        return
    counts = torch.tensor([50, 0, 70, 0, 80, 0, 0, 0], device=device)  # 200 rows, most experts empty
    w = (0.05 * torch.randn(8, 128, 64, device=device)).to(torch.bfloat16)
    rows = torch.randn(200, 128, device=device).to(torch.bfloat16)
    probe = torch.randn(200, 64, device=device)
    results = []
    for extra in (0, 56):  # exactly the rows the offsets cover, then 56 NaN rows after them
        a = torch.cat([rows, torch.full((extra, 128), float("nan"), device=device, dtype=torch.bfloat16)])
        a, wa = a.requires_grad_(), w.clone().requires_grad_()
        y = emo.expert_matmul(a, wa, counts, grouped=True)[:200]
        (y.float() * probe).sum().backward()
        results.append((y.float(), a.grad[:200].float(), wa.grad.float()))
    same = all(torch.equal(p, q) for p, q in zip(*results))
    finite = all(bool(t.isfinite().all()) for t in results[1])
    report["checks"].append(dict(check="grouped matmul never reads past the last offset (bf16)", ok=same and finite,
                                 detail=f"output and gradients with NaN rows after the last offset: finite {finite}, "
                                 f"equal to the run without them {same}"))


def compiled_run(args, device, report):
    """train.py's GPU path (bf16 autocast, torch.compile) through two growths, in this process so the
    compiled graphs can be counted; then a branch from the first run's stage-2 checkpoint, whose steps must
    repeat the first run's within COMPILED_REPEAT. Not bit for bit: inductor accumulates scatter-adds (the
    MoE's combine, the backward of its gathers) with atomic adds on CPU and GPU alike, so two uninterrupted
    compiled bf16 runs already differ, by 6-7e-4 relative on a 2-core CPU (bit for bit equal under
    torch.use_deterministic_algorithms, which makes inductor fall back to ATen's ordered kernels). Eager
    resumes are exact, and tested so."""
    full, branch = Path(args.out_dir) / "compiled", Path(args.out_dir) / "compiled-resumed"
    records = compiled_progressive("compiled bf16 progressive run", [], full, args, device, report)
    stages = [r for r in records if r["kind"] == "stage"]
    clear_run_folder(branch)
    train.run([f"--resume={full / 'stage2.pt'}", f"--out_dir={branch}", *shlex.split(args.train_args)])
    boundary = stages[1]["step"]
    first = {r["step"]: r["loss"] for r in records if r["kind"] == "step" and r["step"] > boundary}
    again = {r["step"]: r["loss"] for r in runs.read_metrics(branch) if r["kind"] == "step" and r["step"] > boundary}
    diffs = [abs(again[step] - loss) / loss for step, loss in first.items()]
    exact = all(again[step] == loss for step, loss in first.items())
    report["checks"].append(dict(
        check="resume at a stage boundary continues the run", ok=max(diffs) < COMPILED_REPEAT,
        detail=f"training loss of the {len(first)} steps after step {boundary}, resumed from stage2.pt vs the "
               f"uninterrupted run: {'equal bit for bit' if exact else f'first step off by {diffs[0]:.1e}, at most by {max(diffs):.1e} (relative)'}; "
               f"allowed {COMPILED_REPEAT:g}, the spread of compiled runs"))


def compiled_progressive(name, extra, out, args, device, report):
    """A compiled bf16 progressive run of the GPU path (train.run in this process, so dynamo's graphs and graph
    breaks can be counted) with `extra` train.py flags, checked: one training and one evaluation graph per
    stage, no graph break, a falling validation loss. Returns its metrics records."""
    from torch._dynamo.utils import counters

    size = GPU_RUN if device.type == "cuda" else CPU_RUN
    flags = [f"--device={device}", "--dtype=bf16", "--compile", *size, "--eval_interval=1000", "--eval_batches=2",
             "--log_interval=1000", "--sample_tokens=0", *extra, *shlex.split(args.train_args)]
    clear_run_folder(out)
    graphs, breaks = counters["stats"]["unique_graphs"], sum(counters["graph_break"].values())
    start = time.time()
    train.run(flags + [f"--out_dir={out}"])
    seconds = time.time() - start
    graphs, breaks = counters["stats"]["unique_graphs"] - graphs, sum(counters["graph_break"].values()) - breaks
    records = runs.read_metrics(out)
    stages = [r for r in records if r["kind"] == "stage"]
    evals = [r for r in records if r["kind"] == "eval"]
    report["checks"].append(dict(
        check=f"{name}: one training and one evaluation graph per stage",
        ok=graphs == 2 * len(stages) and breaks == 0 and len(stages) >= 3,
        detail=f"{len(stages)} stages (E {' -> '.join(str(s['experts']) for s in stages)}), {graphs} graphs "
               f"compiled, {breaks} graph breaks, {seconds:.0f} s with compilation", seconds=seconds))
    report["checks"].append(dict(
        check=f"{name}: validation loss falls", ok=evals[-1]["val_loss"] < evals[0]["val_loss"],
        detail=" -> ".join(f"{e['val_loss']:.3f}" for e in evals),
        stages=[{k: s[k] for k in ("experts", "val_loss", "tokens_per_second", "peak_memory")} for s in stages]))
    return records


def compiled_modular_run(args, device, report):
    """EMO-modular's path under compile: the softmax router (its balancing loss), document pools and attention
    kept inside documents, with two micro-batches a step (gradient accumulation), through two growths."""
    size = dict(f.lstrip("-").split("=") for f in (GPU_RUN if device.type == "cuda" else CPU_RUN))
    micro = int(size["batch_size"]) * int(size["seq_len"])
    compiled_progressive("compiled bf16 modular run (softmax, pools, document attention, 2 micro-batches a step)",
                         ["--router=softmax", "--pool_size_range=0.25,1.0", "--doc_attention=true",
                          "--growth_init=gaussian", f"--batch_tokens={2 * micro}"],
                         Path(args.out_dir) / "compiled-modular", args, device, report)


def torchrun_nccl(args, device, report):
    """A few compiled steps under torchrun on up to 2 GPUs, as the GPU recipes run: the process group (NCCL),
    two micro-batches a step (DDP's no_sync on the first), through a growth after which the ranks must hold
    the same weights and read different batches (the growth record carries both, per rank); with 2 GPUs the
    same under FSDP2 (--shard=fsdp), growing and writing a sharded checkpoint."""
    ranks = min(2, torch.cuda.device_count())
    for shard in ("ddp", "fsdp") if ranks == 2 else ("ddp",):
        folder = Path(args.out_dir) / f"torchrun-{shard}"
        clear_run_folder(folder)
        command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={ranks}",
                   str(HERE / "train.py"), "--device=cuda", "--compile", *GPU_RUN, f"--batch_size={16 // ranks}",
                   "--batch_tokens=8192", "--total_tokens=163840", "--stages=8:0.5,16:0.5", "--sample_tokens=0",
                   f"--shard={shard}", f"--out_dir={folder}", *shlex.split(args.train_args)]
        done = subprocess.run(command, capture_output=True, text=True, timeout=300)
        records = runs.read_metrics(folder) if (folder / "metrics.jsonl").exists() else []
        steps = [r for r in records if r["kind"] == "step"]
        growths = [r for r in records if r["kind"] == "growth"]
        agree = bool(growths) and all(len(set(g["weights_per_rank"])) == 1 for g in growths)
        distinct = bool(growths) and all(len(set(g["tokens_per_rank"])) == ranks for g in growths)
        ok = done.returncode == 0 and len(steps) == 20 and all(math.isfinite(r["loss"]) for r in steps) and agree \
            and distinct
        last_line = (done.stderr.strip().splitlines() or [""])[-1]
        report["checks"].append(dict(
            check=f"torchrun --nproc_per_node={ranks} --compile --shard={shard} (NCCL), 2 micro-batches a step, "
                  f"through a growth", ok=ok,
            detail=f"exit {done.returncode}, {len(steps)} steps, " +
                   (f"loss {steps[0]['loss']:.3f} -> {steps[-1]['loss']:.3f}; ranks hold the same weights after the "
                    f"growth: {agree}; read different batches: {distinct}" if steps else last_line)))


# what one H100 must reach at GPU_SIZE for bench.py gpu to pass (floors that catch a broken path, not targets)
GPU_FLOORS = dict(
    grouped_vs_naive=1.0,  # the grouped dispatch at least as fast as the masked per-expert loop, at every E
    moe_flat=0.5,  # compiled grouped tokens/s at the largest E over the smallest: top-k fixed, so near 1
    step_flat=1.5,  # step time at the largest E over the smallest (the paper measured 1.08 from 8 to 128)
    mfu=0.10,  # the training step's model FLOPs utilisation at the smallest E
    memory=1.15)  # measured peak over train.memory_need's estimate (an eager bound; compiled graphs keep less)


def moe_table_checks(rows):
    """Pass/fail lines for bench.py moe's rows at the GPU size (GPU_FLOORS)."""
    first, last = rows[0], rows[-1]
    flat = last["tokens_per_s"]["grouped+compile"] / first["tokens_per_s"]["grouped+compile"]
    return [dict(check="moe: the grouped dispatch beats the masked per-expert loop at every E",
                 ok=all(r["grouped_vs_naive"] >= GPU_FLOORS["grouped_vs_naive"] for r in rows),
                 detail=", ".join(f"E={r['experts']} {r['grouped_vs_naive']:.2f}x" for r in rows)),
            dict(check=f"moe: compiled throughput at E={last['experts']} at least {GPU_FLOORS['moe_flat']:.0%} of "
                       f"E={first['experts']}'s", ok=flat >= GPU_FLOORS["moe_flat"], detail=f"{flat:.2f}")]


def step_table_checks(rows, estimates):
    """Pass/fail lines for bench.py step's rows at the GPU size (GPU_FLOORS); estimates: train.memory_need's
    total per row."""
    ratio, mfu = rows[-1]["step_time_ratio"], rows[0]["mfu"]
    memory = [r["peak_memory"] / e for r, e in zip(rows, estimates)]
    return [dict(check=f"step: time at E={rows[-1]['experts']} at most {GPU_FLOORS['step_flat']}x E={rows[0]['experts']}'s",
                 ok=ratio <= GPU_FLOORS["step_flat"], detail=f"{ratio:.2f}x"),
            dict(check=f"step: MFU at E={rows[0]['experts']} at least {GPU_FLOORS['mfu']:.0%}",
                 ok=mfu is not None and mfu >= GPU_FLOORS["mfu"], detail=percent(mfu)),
            dict(check=f"step: peak memory within {GPU_FLOORS['memory']}x of train.memory_need's estimate",
                 ok=max(memory) <= GPU_FLOORS["memory"],
                 detail=", ".join(f"E={r['experts']} {m:.2f}" for r, m in zip(rows, memory)))]


def gpu_moe(args, device, report):
    """bench.py moe at a GPU size: E 8, 32, 128, bf16, compiled."""
    moe_args = argparse.Namespace(**{**vars(args), "experts": "8,32,128", "tokens": 16384, "dtype": "bf16",
                                     "compile": True, "repeats": 5, **{k: GPU_SIZE[k] for k in
                                                                        ("d_model", "d_expert", "top_k")}})
    report["moe"] = dict(args={k: getattr(moe_args, k) for k in ("tokens", "d_model", "d_expert", "top_k")},
                         rows=bench_moe(moe_args))
    report["checks"] += moe_table_checks(report["moe"]["rows"])


def gpu_step(args, device, report):
    """bench.py step at the same size with 4 layers: E 8, 32, 128, bf16, compiled."""
    flags = " ".join(f"--{k}={v}" for k, v in GPU_SIZE.items()) + " --compile --dtype=bf16 --device=cuda"
    report["step"] = bench_step(argparse.Namespace(experts="8,32,128", repeats=5, train_args=flags))
    shape = {k: v for k, v in GPU_SIZE.items() if k != "batch_size"}
    estimates = [sum(train.memory_need(emo.Config(**shape, n_experts=r["experts"]), GPU_SIZE["batch_size"], True, 1,
                                       False).values()) for r in report["step"]["rows"]]
    report["checks"] += step_table_checks(report["step"]["rows"], estimates)


def percent(value):
    return "-" if value is None else f"{value:.1%}"


def print_gpu(report, args):
    print(f"bench.py gpu: {report['machine']}, torch {report['torch']}; {args.out_dir}/gpu.json\n")
    print("| check | result | detail |\n| --- | --- | --- |")
    for c in report["checks"]:
        print(f"| {c['check']} | {'ok' if c['ok'] else 'FAILED'} | {c['detail']} |")
    for line in report["skipped"]:
        print(f"| {line.split(':')[0]} | skipped | {line.split(': ', 1)[1]} |")
    if "moe" in report:
        print("\n| E | grouped+compile tok/s | dense+compile tok/s | grouped/dense | grouped/loop | MFU | peak MB |")
        print("| --- | --- | --- | --- | --- | --- | --- |")
        for r in report["moe"]["rows"]:
            print(f"| {r['experts']} | {r['tokens_per_s']['grouped+compile']:,.0f} | {r['tokens_per_s']['dense+compile']:,.0f}"
                  f" | {r['compiled_grouped_vs_dense']:.2f}x | {r['grouped_vs_loop']:.2f}x | {percent(r['mfu'])} | "
                  f"{r['peak_memory']['grouped+compile'] / 2**20:,.0f} |")
    if "step" in report:
        print("\n| E | step ms | vs first | tok/s | MFU | peak MB | state MB | bf16 cast of the experts |\n"
              "| --- | --- | --- | --- | --- | --- | --- | --- |")
        for r in report["step"]["rows"]:
            print(f"| {r['experts']} | {r['step_seconds'] * 1e3:.1f} | {r['step_time_ratio']:.3f}x | "
                  f"{r['tokens_per_second']:,.0f} | {percent(r['mfu'])} | {r['peak_memory'] / 2**20:,.0f} | "
                  f"{r['state_memory'] / 2**20:,.0f} | {percent(r['cast_share'])} |")
    print(f"\n{'all checks passed' if report['ok'] else 'SOME CHECKS FAILED'}"
          + ("" if not report["skipped"] else f"; skipped {len(report['skipped'])}: " + "; ".join(report["skipped"])))


def strict_json(value):
    """JSON any parser reads: a NaN or infinity (a ratio to a zero spread, say) is null, a path is its text."""
    return json.dumps(runs.finite_or_null(json.loads(json.dumps(value, default=str))), indent=1, allow_nan=False)


BENCH_OWNED = ("out_dir", "resume", "seed", "total_tokens", "stop_at")  # train.py flags bench.py sets per run


def check_args(args):
    """bench.py's own flags, before any work: one line naming the flag."""
    for flag in ("tokens", "d_model", "d_expert", "top_k", "repeats"):
        require(getattr(args, flag) >= 1, f"--{flag}", getattr(args, flag), "a positive integer")
    require(math.isfinite(args.total_tokens) and args.total_tokens >= 1, "--total_tokens", args.total_tokens,
            "a finite number of tokens >= 1")
    for flag, lo in (("seeds", 0), ("experts", 1)):
        try:
            values = [int(v) for v in getattr(args, flag).split(",")]
        except ValueError:
            values = []
        require(values and min(values) >= lo and len(set(values)) == len(values), f"--{flag}", getattr(args, flag),
                f"comma-separated integers >= {lo}, each once")
    trained = args.trained_at.split(",")
    require(set(trained) <= set(FRONTIER_TRAINED.split(",")) and len(set(trained)) == len(trained), "--trained_at",
            args.trained_at, f"a comma-separated subset of {FRONTIER_TRAINED}, each once")
    leads = args.leads.split(",")
    require(all(lead in MODULAR_LEADS for lead in leads) and len(set(leads)) == len(leads), "--leads", args.leads,
            f"a comma-separated subset of {','.join(MODULAR_LEADS)}, each once")
    inits = args.inits.split(",")
    require(all(i in emo.GROWTH_INITS for i in inits), "--inits", args.inits,
            f"a comma-separated subset of {','.join(emo.GROWTH_INITS)}")
    try:
        train_args = shlex.split(args.train_args)
    except ValueError as err:  # an unbalanced quote
        raise SettingError(f"--train_args={args.train_args}: not a shell-quoted list of flags ({err})") from None
    given = {flag[2:].partition("=")[0] for flag in train_args if flag.startswith("--")}
    owned = given & set(BENCH_OWNED)
    require(not owned, "--train_args", args.train_args, f"train.py flags other than --{', --'.join(BENCH_OWNED)}: "
            f"bench.py sets those for each run (it takes --out_dir, --seeds and --total_tokens itself)")


def main(argv=None):
    parser = flags.ArgumentParser(prog="bench.py", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("what", choices=["moe", "growth", "step", "repro", "frontier", "modular", "gpu"], help="what to run")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="cpu, cuda or cuda:N")
    parser.add_argument("--dtype", choices=["fp32", "bf16"], default=None, help="default: bf16 on GPU, fp32 on CPU")
    parser.add_argument("--compile", action="store_true", help="also time torch.compile'd grouped and dense paths")
    parser.add_argument("--tokens", type=int, default=4096, help="moe: tokens per forward")
    parser.add_argument("--d_model", type=int, default=256, help="moe: model width")
    parser.add_argument("--d_expert", type=int, default=256, help="moe: hidden size of one expert")
    parser.add_argument("--top_k", type=int, default=2, help="moe: routed experts per token")
    parser.add_argument("--repeats", type=int, default=5, help="moe, step: timed repeats (the median is reported)")
    parser.add_argument("--seeds", default=None, help="growth, repro, frontier, modular: comma-separated seeds (default 0; 0,1,2; 0,1,2; 0,1,2)")
    parser.add_argument("--total_tokens", type=float, default=None,
                        help="growth, repro, frontier: tokens per training run (default 400000, 2500000, 2500000)")
    parser.add_argument("--out_dir", default=None, help="growth, repro, frontier: where the runs' folders go "
                        "(default runs/bench, runs/repro, runs/frontier)")
    parser.add_argument("--experts", default=None, help="moe, step: E to time (default 8,32,128; 8,16,32,64,128); "
                        "repro, frontier: E per stage of the progressive runs (default 2,4,8,16,32)")
    parser.add_argument("--inits", default="gaussian,copy,silent,upcycle", help="growth: growth inits to run")
    parser.add_argument("--trained_at", default="0.25", help="frontier: shares of E_max at which MoE and dense "
                        f"models are trained from scratch, a comma-separated subset of {FRONTIER_TRAINED}")
    parser.add_argument("--train_args", default="", help="step, growth, repro, frontier: train.py flags (model, batch, device, "
                        "compile), e.g. a --config")
    parser.add_argument("--leads", default=",".join(MODULAR_LEADS), help="modular: comma-separated leads to "
                        f"measure, each a change from the paper's recipe ({', '.join(MODULAR_LEADS)})")
    parser.add_argument("--json", action="store_true", help="print JSON instead of the table")
    args = parser.parse_args(argv)
    args.dtype = args.dtype or ("bf16" if args.device.startswith("cuda") else "fp32")
    args.out_dir = args.out_dir or f"runs/{args.what if args.what in ('repro', 'frontier', 'modular', 'gpu') else 'bench'}"
    args.experts = args.experts or {"moe": "8,32,128", "step": "8,16,32,64,128"}.get(args.what, "2,4,8,16,32")
    args.seeds = args.seeds or {"repro": "0,1,2", "frontier": "0,1,2", "modular": "0,1,2"}.get(args.what, "0")
    if args.total_tokens is None:
        args.total_tokens = {"repro": 2_500_000, "frontier": 2_500_000, "modular": 1_000_000}.get(args.what, 400_000)
    runs.keep_freed_memory()
    bench, show = {"moe": (bench_moe, print_moe), "growth": (bench_growth, print_growth),
                   "step": (bench_step, print_step), "repro": (bench_repro, print_repro),
                   "frontier": (bench_frontier, print_frontier), "modular": (bench_modular, print_modular),
                   "gpu": (bench_gpu, print_gpu)}[args.what]
    try:
        check_args(args)
        args.total_tokens = int(args.total_tokens)
        runs.resolve_device(args.device)
        rows = bench(args)
    except (SettingError, DataError, train.TrainingError) as err:
        sys.exit(f"bench.py: {err}")
    if args.json:
        result = rows if isinstance(rows, dict) else {"rows": rows}  # step and repro return several tables
        print(strict_json({"args": vars(args), "machine": machine(torch.device(args.device)), **result}))
    else:
        show(rows, args)
    if args.what == "gpu" and not rows["ok"]:
        sys.exit(1)


if __name__ == "__main__":
    main()

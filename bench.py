"""Benchmarks. Every number is measured in this run; ratios compare paths timed side by side.

python bench.py moe [--device=cuda] [--dtype=bf16] [--compile] [--json]
    one MoE layer, forward + backward, tokens/s for E in {8, 32, 128} at fixed top-k, beside
    (a) a naive masked per-expert loop and (b) a dense SwiGLU with the same active parameters.
python bench.py growth [--seeds=0,1] [--json]
    train.py's tiny model through E = 2 -> 4 -> 8 once per growth init (gaussian / copy / silent):
    validation loss right before and right after each growth, steps until it is back, adoption of the
    new experts, and the final loss.
python bench.py step [--experts=8,16,32,64,128] [--train_args="..."] [--json]
    train.py's training step (its model and settings; --train_args changes them) at each E, top-k fixed:
    step time and its ratio to the first E, the optimizer step's share, peak and weight+grad+Adam memory,
    and the time of one growth E -> 2E. The fitted exponent of time ~ E^rho feeds plan.py --step_times.
python bench.py repro [--seeds=0,1] [--experts=2,4,8,16,32] [--total_tokens=1e6] [--train_args="..."] [--json]
    the paper's claim at small scale: same model, data and tokens for fixed E_max, fixed E_max/2 and
    progressive growth up to E_max with each growth init, one train.py process per run. Final val loss
    (overall, per domain), training time, tokens/s and memory per stage; loss-seedS.png per seed. A run
    folder that already holds a finished run of the same command is reused, not re-run.
"""

import argparse
import json
import math
import platform
import shlex
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

import emo
import train
from data.corpus import DataError
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
    rows = []
    for n_experts in (8, 32, 128):
        cfg = emo.Config(d_model=args.d_model, d_expert=args.d_expert, n_experts=n_experts, top_k=args.top_k,
                         n_shared=0, n_head=4, n_layer=1)
        torch.manual_seed(0)
        moe = emo.MoE(cfg).to(device)
        dense = emo.SwiGLU(args.d_model, args.top_k * args.d_expert).to(device)  # same active parameters
        x = torch.randn(args.tokens, args.d_model, device=device, requires_grad=True)

        def grouped(x):
            with torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32):
                return moe(x.unsqueeze(0))[0]

        def loop(x):
            moe.use_grouped_mm = False
            try:
                return grouped(x)
            finally:
                moe.use_grouped_mm = True

        def naive(x):
            with torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32):
                return naive_moe(moe, x)

        def dense_ffn(x):
            with torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32):
                return dense(x)

        paths = {"grouped": grouped, "loop": loop, "naive": naive, "dense": dense_ffn}
        if args.compile:
            paths["grouped+compile"] = torch.compile(grouped, dynamic=False)
            paths["dense+compile"] = torch.compile(dense_ffn, dynamic=False)
        tps = {name: args.tokens / seconds_per_call(fn, x, args.repeats, device) for name, fn in paths.items()}
        rows.append({"experts": n_experts, "tokens_per_s": tps,
                     "grouped_vs_dense": tps["grouped"] / tps["dense"],
                     "grouped_vs_naive": tps["grouped"] / tps["naive"]})
    return rows


def machine(device):
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads"


def print_moe(rows, args):
    print(f"MoE layer fwd+bwd, {args.tokens} tokens, d_model={args.d_model}, d_expert={args.d_expert}, "
          f"top_k={args.top_k}, {args.dtype}, {machine(torch.device(args.device))}, torch {torch.__version__}")
    names = list(rows[0]["tokens_per_s"])
    print(f"{'E':>5} " + " ".join(f"{n + ' tok/s':>22}" for n in names) + f" {'grouped/dense':>14} {'grouped/naive':>14}")
    for r in rows:
        cells = " ".join(f"{r['tokens_per_s'][n]:>22,.0f}" for n in names)
        print(f"{r['experts']:>5} {cells} {r['grouped_vs_dense']:>13.2f}x {r['grouped_vs_naive']:>13.2f}x")


def bench_growth(args):
    rows = []
    for seed in [int(x) for x in args.seeds.split(",")]:
        for init in ("gaussian", "copy", "silent"):
            out = Path(args.out_dir) / f"growth-{init}-seed{seed}"
            shutil.rmtree(out, ignore_errors=True)
            start = time.time()
            train.run([f"--out_dir={out}", f"--growth_init={init}", f"--total_tokens={args.total_tokens}",
                       f"--seed={seed}", f"--phase_in_steps={args.phase_in_steps}", "--eval_interval=5",
                       "--eval_batches=4", "--log_interval=1000000", "--sample_tokens=0"])
            records = train.read_metrics(out)
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
    print(f"growth on train.py's tiny default model, {args.total_tokens:,} tokens, E 2->4->8, top_k 2; "
          f"silent phase-in {args.phase_in_steps} steps; {machine(torch.device('cpu'))}, torch {torch.__version__}")
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
    """train.py's step (forward, backward, clipping, AdamW, balancing; train.timed_step) for each E."""
    argv = shlex.split(args.train_args)
    rows = [step_row(argv, int(E), args.repeats) for E in args.experts.split(",")]
    for r in rows:
        r["step_time_ratio"] = r["step_seconds"] / rows[0]["step_seconds"]
    rho = emo.step_time_exponent([r["experts"] for r in rows], [r["step_seconds"] for r in rows]) \
        if len(rows) > 1 else None
    s, model_settings, _ = train.parse(argv)
    return dict(rows=rows, step_time_exponent=rho, settings=dict(**vars(s), **model_settings),
                device=rows[0]["device"])


def step_row(argv, n_experts, repeats):
    """One E: step time, the optimizer's share of it, peak and state memory, and one growth E -> 2E."""
    raw, optimizer, device, step = train.timed_step(argv, n_experts)
    for i in range(2):  # warm-up: first-call allocations, compilation, optimizer state
        step(i)
    tracked = train.reset_peak_memory(device)
    seconds = statistics.median(timed(lambda: step(i), device) for i in range(2, 2 + repeats))
    peak = train.peak_memory(device) if tracked else None
    # the optimizer step alone, on gradients of the size the training step leaves (zero_grad freed them)
    for p in raw.parameters():
        p.grad = torch.zeros_like(p)
    optimizer_seconds = statistics.median(timed(optimizer.step, device) for _ in range(repeats))
    optimizer.zero_grad(set_to_none=True)
    state = train.state_memory(raw, optimizer)
    growth = timed(lambda: (emo.grow_experts(raw, 2 * n_experts, init="gaussian"),
                            emo.grow_optimizer(optimizer, "reset")), device)
    tokens = raw.config.seq_len * train.parse(argv)[0].batch_size
    return dict(experts=n_experts, step_seconds=seconds, tokens_per_second=tokens / seconds,
                optimizer_seconds=optimizer_seconds, optimizer_share=optimizer_seconds / seconds, peak_memory=peak,
                state_memory=state, growth_seconds=growth, device=str(device))


def print_step(result, args):
    device = torch.device(result["device"])
    print(f"training step vs E at fixed top-k; train.py flags: {args.train_args or '(defaults)'}; {machine(device)}, "
          f"torch {torch.__version__}; median of {args.repeats} steps")
    print(f"{'E':>5} {'step ms':>9} {'vs first':>9} {'tok/s':>9} {'optimizer ms':>13} {'share':>6} {'peak MB':>8} "
          f"{'state MB':>9} {'grow E->2E ms':>14}")
    for r in result["rows"]:
        peak = "-" if r["peak_memory"] is None else f"{r['peak_memory'] / 2**20:,.0f}"
        print(f"{r['experts']:>5} {r['step_seconds'] * 1e3:>9.1f} {r['step_time_ratio']:>8.3f}x "
              f"{r['tokens_per_second']:>9,.0f} {r['optimizer_seconds'] * 1e3:>13.1f} {r['optimizer_share']:>6.1%} "
              f"{peak:>8} {r['state_memory'] / 2**20:>9,.1f} {r['growth_seconds'] * 1e3:>14.1f}")
    rows = result["rows"]
    if result["step_time_exponent"] is not None:
        print(f"step time ~ E^{result['step_time_exponent']:.4f}: {rows[-1]['step_time_ratio']:.3f}x from "
              f"E={rows[0]['experts']} to {rows[-1]['experts']} (the paper, Fig. 1: 1.08x from 8 to 128 at ~1.1B "
              f"active, E^{emo.STEP_TIME_EXPONENT:.4f})")
    print("state: weights + gradients + AdamW moments; peak: " + ("CUDA allocator" if device.type == "cuda" else
          "the process's resident set (Python and torch included)") + "; grow: grow_experts + grow_optimizer")


def repro_arms(args):
    """{name: train.py flags}: the two fixed baselines, then progressive growth once per init."""
    experts = args.experts.split(",")
    e_max = int(experts[-1])
    arms = {f"fixed-{e_max}": ["--schedule=fixed", f"--experts={e_max}"],
            f"fixed-{e_max // 2}": ["--schedule=fixed", f"--experts={e_max // 2}"]}
    for init in args.inits.split(","):
        arms[f"progressive-{init}"] = ["--schedule=progressive", f"--experts={args.experts}", f"--growth_init={init}"]
    return arms


def bench_repro(args):
    """Each arm for each seed as its own train.py process (a clean process: fair time and memory)."""
    rows, plots = [], []
    for seed in [int(x) for x in args.seeds.split(",")]:
        folders = {}
        for name, flags in repro_arms(args).items():
            out = Path(args.out_dir) / f"{name}-seed{seed}"
            command = [sys.executable, str(HERE / "train.py"), *flags, f"--seed={seed}",
                       f"--total_tokens={args.total_tokens}", f"--phase_in_steps={args.phase_in_steps}",
                       "--sample_tokens=0", *shlex.split(args.train_args), f"--out_dir={out}"]
            if not finished(out, command):
                shutil.rmtree(out, ignore_errors=True)
                out.mkdir(parents=True)
                print(f"running {name} seed {seed}: {shlex.join(command[1:])}", file=sys.stderr)
                with open(out / "train.log", "w") as log:
                    if subprocess.run(command, stdout=log, stderr=subprocess.STDOUT).returncode:
                        sys.exit(f"bench.py: {name} seed {seed} failed: see {out / 'train.log'}")
                (out / "command.json").write_text(json.dumps(command))
            rows.append(repro_row(name, seed, out))
            folders[name] = out
        plots.append(train.plot_losses(folders, Path(args.out_dir) / f"loss-seed{seed}.png"))
    return dict(runs=rows, arms=repro_summary(rows), plots=plots)


def finished(out, command):
    """Does `out` hold a finished run with exactly these train.py flags? (command.json is written last)"""
    done = out / "command.json"
    return done.exists() and json.loads(done.read_text())[2:] == command[2:]


def repro_row(name, seed, out):
    """One run's results from its metrics.jsonl: final losses, the val-loss curve, growth events, balance,
    time and the per-stage costs."""
    records = train.read_metrics(out)
    final = [r for r in records if r["kind"] == "eval"][-1]
    stages = [r for r in records if r["kind"] == "stage"]
    cv = [r["load_cv"] for r in records if r["kind"] == "step"]
    curve = {r["step"]: r["val_loss"] for r in records if r["kind"] == "eval"}
    growths = growth_row(records, name, seed, None)["events"]  # spike and adoption at each growth
    return dict(arm=name, seed=seed, val_loss=final["val_loss"], per_domain=final["val_loss_per_domain"],
                curve=curve, growths=growths, load_cv_first_tenth=statistics.mean(cv[:len(cv) // 10 or 1]),
                load_cv_last_tenth=statistics.mean(cv[-(len(cv) // 10 or 1):]),
                train_seconds=sum(st["train_seconds"] for st in stages), wall_seconds=stages[-1]["seconds"],
                stages=[{k: st[k] for k in ("experts", "tokens", "tokens_per_second", "peak_memory", "state_memory")}
                        for st in stages])


def repro_summary(rows):
    """Per arm, over seeds: mean and range of the final loss; its gap and time ratio to fixed E_max, seed
    by seed (the same seed shares data order and initial weights); per stage mean tokens/s and memory."""
    arms = list(dict.fromkeys(r["arm"] for r in rows))
    base = {r["seed"]: r for r in rows if r["arm"] == arms[0]}
    common_steps = sorted(set.intersection(*(set(r["curve"]) for r in rows)))  # evals every arm made
    mean, summary = statistics.mean, []
    for arm in arms:
        runs = [r for r in rows if r["arm"] == arm]
        first_stage_ratio = lambda key: mean([r["stages"][0][key] / base[r["seed"]]["stages"][0][key] for r in runs])
        stages = [{k: mean([run["stages"][i][k] or 0 for run in runs]) for k in runs[0]["stages"][i]}
                  for i in range(len(runs[0]["stages"]))]
        summary.append(dict(
            arm=arm, seeds=len(runs), val_loss=mean([r["val_loss"] for r in runs]),
            curve={step: mean([r["curve"][step] for r in runs]) for step in common_steps},
            val_loss_min=min(r["val_loss"] for r in runs), val_loss_max=max(r["val_loss"] for r in runs),
            gap=mean([r["val_loss"] / base[r["seed"]]["val_loss"] - 1 for r in runs]),
            time_ratio=mean([r["train_seconds"] / base[r["seed"]]["train_seconds"] for r in runs]),
            first_stage_memory_ratio=first_stage_ratio("peak_memory") if stages[0]["peak_memory"] else None,
            first_stage_state_ratio=first_stage_ratio("state_memory"),
            stages=stages))
    return summary


def print_repro(result, args):
    on_gpu = torch.cuda.is_available() and "--device=cpu" not in args.train_args  # where train.py's "auto" ran
    print(f"repro: {args.total_tokens:,.0f} tokens per run, stages up to E={args.experts.split(',')[-1]}, "
          f"train.py flags: {args.train_args or '(defaults)'}; {machine(torch.device('cuda' if on_gpu else 'cpu'))}, "
          f"torch {torch.__version__}")
    domains = list(result["runs"][0]["per_domain"])
    print(f"{'arm':>20} {'seed':>4} {'val loss':>8} " + " ".join(f"{d:>7}" for d in domains)
          + f" {'train s':>8} {'wall s':>7} {'load CV first/last 10%':>23}")
    for r in result["runs"]:
        print(f"{r['arm']:>20} {r['seed']:>4} {r['val_loss']:>8.4f} "
              + " ".join(f"{r['per_domain'][d]:>7.3f}" for d in domains)
              + f" {r['train_seconds']:>8.0f} {r['wall_seconds']:>7.0f} "
              f"{r['load_cv_first_tenth']:>15.2f} / {r['load_cv_last_tenth']:.2f}")
    base = result["arms"][0]["arm"]
    print(f"\n{'arm':>20} {'val loss (min-max)':>25} {'vs ' + base:>13} {'train time':>11} {'stage-1 state':>13}"
          f" {'stage-1 peak':>12}")
    for a in result["arms"]:
        peak = "-" if a["first_stage_memory_ratio"] is None else f"{a['first_stage_memory_ratio']:.2f}x"
        print(f"{a['arm']:>20} {a['val_loss']:>8.4f} ({a['val_loss_min']:.4f}-{a['val_loss_max']:.4f}) "
              f"{a['gap']:>+12.2%} {a['time_ratio']:>10.3f}x {a['first_stage_state_ratio']:>12.2f}x {peak:>12}")
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
    print("train time: the sum of training steps (no evals, growth or checkpoints), as a ratio to the first arm's "
          "run of the same seed; peak: " + ("CUDA allocator" if on_gpu else
                                          "the process's resident set (Python and torch included)"))
    for line in result["plots"]:
        print(line)


def check_args(args):
    """bench.py's own flags, before any work: one line naming the flag."""
    for flag in ("tokens", "d_model", "d_expert", "top_k", "repeats", "phase_in_steps"):
        require(getattr(args, flag) >= 1, f"--{flag}", getattr(args, flag), "a positive integer")
    require(math.isfinite(args.total_tokens) and args.total_tokens >= 1, "--total_tokens", args.total_tokens,
            "a finite number of tokens >= 1")
    for flag, lo in (("seeds", 0), ("experts", 1)):
        try:
            values = [int(v) for v in getattr(args, flag).split(",")]
        except ValueError:
            values = []
        require(values and min(values) >= lo, f"--{flag}", getattr(args, flag),
                f"comma-separated integers >= {lo}")
    inits = args.inits.split(",")
    require(all(i in emo.GROWTH_INITS for i in inits), "--inits", args.inits,
            f"a comma-separated subset of {','.join(emo.GROWTH_INITS)}")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("what", choices=["moe", "growth", "step", "repro"])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", choices=["fp32", "bf16"], default=None, help="default: bf16 on GPU, fp32 on CPU")
    parser.add_argument("--compile", action="store_true", help="also time torch.compile'd grouped and dense paths")
    parser.add_argument("--tokens", type=int, default=4096)
    parser.add_argument("--d_model", type=int, default=256)
    parser.add_argument("--d_expert", type=int, default=256)
    parser.add_argument("--top_k", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--seeds", default="0", help="growth: comma-separated seeds")
    parser.add_argument("--total_tokens", type=float, default=None,
                        help="growth, repro: tokens per training run (default 400000, 1000000)")
    parser.add_argument("--phase_in_steps", type=int, default=20, help="growth: silent init's phase-in")
    parser.add_argument("--out_dir", default=None, help="growth, repro: where the runs' folders go "
                        "(default runs/bench, runs/repro)")
    parser.add_argument("--experts", default=None, help="step: E to time (default 8,16,32,64,128); "
                        "repro: E per stage of the progressive runs (default 2,4,8,16,32)")
    parser.add_argument("--inits", default="gaussian,copy,silent", help="repro: growth inits to run")
    parser.add_argument("--train_args", default="", help="step, repro: train.py flags (model, batch, device, "
                        "compile), e.g. a --config")
    parser.add_argument("--json", action="store_true", help="print JSON instead of the table")
    args = parser.parse_args(argv)
    args.dtype = args.dtype or ("bf16" if args.device.startswith("cuda") else "fp32")
    args.out_dir = args.out_dir or f"runs/{'repro' if args.what == 'repro' else 'bench'}"
    args.experts = args.experts or ("8,16,32,64,128" if args.what == "step" else "2,4,8,16,32")
    if args.total_tokens is None:
        args.total_tokens = 1_000_000 if args.what == "repro" else 400_000
    train.keep_freed_memory()
    bench, show = {"moe": (bench_moe, print_moe), "growth": (bench_growth, print_growth),
                   "step": (bench_step, print_step), "repro": (bench_repro, print_repro)}[args.what]
    try:
        check_args(args)
        args.total_tokens = int(args.total_tokens)
        train.resolve_device(args.device)
        rows = bench(args)
    except (SettingError, DataError, train.TrainingError) as err:
        sys.exit(f"bench.py: {err}")
    if args.json:
        result = rows if isinstance(rows, dict) else {"rows": rows}  # step and repro return several tables
        print(json.dumps({"args": vars(args), "machine": machine(torch.device(args.device)), **result}, indent=1))
    else:
        show(rows, args)


if __name__ == "__main__":
    main()

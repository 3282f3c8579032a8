"""Train an MoE whose expert pool grows in stages (EMO-progressive), on CPU, one GPU, or many via torchrun.

python train.py                                    # tiny default: E = 2 -> 4 -> 8, ~5 minutes on 2 CPU cores
python train.py --config=configs/gpu-8x.json       # settings from a JSON file; flags override it
torchrun --standalone --nproc_per_node=8 train.py --config=configs/gpu-8x.json
python train.py --resume=runs/default              # continue exactly where a run stopped
python train.py --schedule=fixed --experts=8       # the fixed-E baseline

Every Settings and emo.Config field is a --key=value flag. The run folder (--out_dir) gets config.json,
metrics.jsonl (one record per step, eval, growth and stage end), latest.pt and one checkpoint per stage.
"""

import json
import math
import os
import signal
import sys
import time
from contextlib import nullcontext
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel as DDP

import emo

HERE = Path(__file__).resolve().parent
CHECKPOINT_FORMAT = "emo-checkpoint-1"


@dataclass
class Settings:
    data: str = "data/default"  # a corpus folder made by data/prepare.py
    out_dir: str = "runs/default"
    resume: str = ""  # a checkpoint, or a run folder (its latest.pt)
    config: str = ""  # a JSON file of settings; flags override it
    # the schedule
    total_tokens: int = 800_000
    schedule: str = "progressive"  # "progressive" (stage budgets from the scaling law) or "fixed"
    experts: str = "2,4,8"  # E per stage; the fixed schedule uses the last
    stages: str = ""  # explicit stages "E:fraction,...", e.g. "8:0.235,16:0.095,...": overrides the solver
    growth_init: str = "gaussian"  # gaussian (the paper), copy, silent (function-preserving)
    growth_optimizer: str = "reset"  # reset (the paper) or keep the old experts' Adam moments
    # optimisation
    batch_size: int = 16  # sequences per micro-batch per process
    batch_tokens: int = 0  # tokens per optimizer step over all processes (0: one micro-batch per process)
    lr: float = 3e-3
    min_lr_frac: float = 0.0  # the LR decays to lr * min_lr_frac
    lr_schedule: str = "wsd"  # warmup-stable-decay (the paper) or cosine
    warmup_steps: int = 20
    rewarm_steps: int = 20  # LR re-warm after each growth (the paper: 500 of ~240K steps)
    decay_frac: float = 0.1  # wsd: linear decay over the last 10% of steps (the paper)
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    grad_clip: float = 1.0
    # running
    device: str = "auto"  # auto, cpu, cuda, cuda:N
    compile: bool = False
    seed: int = 0
    eval_interval: int = 50  # steps between validation evals (and at every stage end)
    eval_batches: int = 8
    log_interval: int = 10
    sample_tokens: int = 48  # length of the text sample printed at the end (0: none)
    stop_at: int = 0  # save and exit after this many steps (a time-limited job); resume later
    checkpoint_interval: int = 100  # steps between latest.pt saves (also at every stage end and the end)
    keep_latest: int = 1  # checkpoints kept besides stage ends: with N > 1 the N newest as stepS.pt too
    collapse_steps: int = 200  # warn when an expert of a layer got no token for this many steps
    max_load_cv: float = 2.0  # warn when a layer's expert-load coefficient of variation exceeds this


SCHEDULES, LR_SCHEDULES = ("progressive", "fixed"), ("wsd", "cosine")
# settings a resumed run may change; anything else must match the checkpoint
RESUMABLE = {"resume", "config", "device", "compile", "eval_interval", "eval_batches", "log_interval",
             "sample_tokens", "stop_at", "checkpoint_interval", "keep_latest", "out_dir", "collapse_steps",
             "max_load_cv"}
PER_INVOCATION = {"resume", "config", "stop_at"}  # orders for this command only, never inherited on resume


class SettingError(ValueError):
    """A bad flag, file or value: printed as one line before any data loading or device allocation."""


class TrainingError(RuntimeError):
    """The run cannot go on (a non-finite loss): printed as one line naming the step and the last checkpoint."""


# ---------------------------------------------------------------------------------------------
# Settings: flags and config files -> validated Settings + emo.Config
# ---------------------------------------------------------------------------------------------


def parse(argv):
    """--key=value flags (and a --config JSON file) -> (Settings, model settings dict, keys given)."""
    values = {}
    for arg in argv:
        if not arg.startswith("--"):
            raise SettingError(f"unexpected argument {arg!r}: settings are --key=value flags")
        key, _, value = arg[2:].partition("=")
        values[key] = value if _ else "true"
    if values.get("config"):
        values = {**read_config_file(values["config"]), **values}
    known = {f.name: f.type for f in fields(Settings)} | {f.name: f.type for f in fields(emo.Config)}
    unknown = sorted(set(values) - set(known))
    if unknown:
        hint = " (the stage list --experts sets E)" if "n_experts" in unknown else ""
        raise SettingError(f"unknown setting --{unknown[0]}{hint}; allowed: {', '.join(sorted(known))}")
    if "n_experts" in values:
        raise SettingError("--n_experts is set by the schedule: give the stage list --experts=2,4,8 instead")
    if values.get("stages") and "experts" in values:
        raise SettingError("give --stages=E:fraction,... or --experts=E,..., not both (--stages names its E)")
    typed = {key: convert(key, value, known[key]) for key, value in values.items()}
    settings = Settings(**{k: v for k, v in typed.items() if k in Settings.__dataclass_fields__})
    model = {k: v for k, v in typed.items() if k in emo.Config.__dataclass_fields__}  # the rest: Config's
    return settings, model, set(values)


def read_config_file(path):
    try:
        data = json.loads(Path(path).read_text())
    except (OSError, ValueError) as err:
        raise SettingError(f"--config={path}: cannot read a JSON object ({type(err).__name__})") from None
    if not isinstance(data, dict):
        raise SettingError(f"--config={path}: must hold a JSON object of settings")
    return data


def convert(key, value, kind):
    """A flag's text (or a JSON value) as the field's type, or a one-line error naming it."""
    if not isinstance(value, str):  # from a JSON file
        value = ",".join(map(str, value)) if isinstance(value, list) else json.dumps(value)
    if "None" in str(kind):  # pool_size (int | float | None), pool_size_range (tuple | None)
        if value.lower() in ("none", "null", ""):
            return None
        try:
            numbers = tuple(int(v) if v.strip().lstrip("-").isdigit() else float(v) for v in value.split(","))
        except ValueError:
            raise SettingError(f"--{key}={value}: expected a number, a pair lo,hi, or none") from None
        return numbers if "tuple" in str(kind) else numbers[0] if len(numbers) == 1 else numbers
    kind = {"int": int, "float": float, "str": str, "bool": bool}.get(kind, kind)
    try:
        if kind is bool:
            if value.lower() not in ("true", "false", "1", "0"):
                raise ValueError
            return value.lower() in ("true", "1")
        if kind is int:
            number = float(value)  # allows 2e6
            if number != int(number):
                raise ValueError
            return int(number)
        return kind(value.strip('"') if kind is str else value)
    except ValueError:
        raise SettingError(f"--{key}={value}: expected {'true/false' if kind is bool else kind.__name__}") from None


def validate(s, cfg, world_size):
    """Everything that can be checked before touching data or a device."""
    def need(ok, key, allowed):
        if not ok:
            raise SettingError(f"--{key}={getattr(s, key)!r} is not allowed: must be {allowed}")

    need(s.schedule in SCHEDULES, "schedule", f"one of {', '.join(SCHEDULES)}")
    need(s.lr_schedule in LR_SCHEDULES, "lr_schedule", f"one of {', '.join(LR_SCHEDULES)}")
    need(s.growth_init in emo.GROWTH_INITS, "growth_init", f"one of {', '.join(emo.GROWTH_INITS)}")
    need(s.growth_optimizer in emo.OPTIMIZER_MODES, "growth_optimizer", f"one of {', '.join(emo.OPTIMIZER_MODES)}")
    for key in ("total_tokens", "batch_size", "eval_interval", "eval_batches", "log_interval", "collapse_steps",
                "keep_latest"):
        need(getattr(s, key) >= 1, key, "a positive integer")
    for key in ("batch_tokens", "warmup_steps", "rewarm_steps", "sample_tokens", "stop_at", "checkpoint_interval"):
        need(getattr(s, key) >= 0, key, "an integer >= 0")
    need(s.lr > 0, "lr", "> 0")
    need(s.max_load_cv > 0, "max_load_cv", "> 0")
    need(0 <= s.min_lr_frac <= 1, "min_lr_frac", "in [0, 1]")
    need(0 <= s.decay_frac <= 1, "decay_frac", "in [0, 1]")
    need(s.weight_decay >= 0 and s.grad_clip >= 0, "weight_decay", ">= 0 (grad_clip too)")
    micro_tokens = s.batch_size * cfg.seq_len * world_size
    need(s.batch_tokens % micro_tokens == 0, "batch_tokens",
         f"a multiple of batch_size * seq_len * processes = {s.batch_size}*{cfg.seq_len}*{world_size} = {micro_tokens}")
    stages = stage_experts(s)
    need(s.total_tokens >= (s.batch_tokens or micro_tokens) * len(stages), "total_tokens",
         f"at least one optimizer step ({s.batch_tokens or micro_tokens} tokens) per stage")


def stage_experts(s):
    """The E of each stage, from --stages or --experts."""
    key, text = ("stages", s.stages) if s.stages else ("experts", s.experts)
    try:
        experts = [int(part.split(":")[0]) for part in text.split(",")]
    except ValueError:
        raise SettingError(f"--{key}={text}: expected comma-separated {'E:fraction' if s.stages else 'integers'}") from None
    if s.schedule == "fixed" and not s.stages:
        experts = experts[-1:]
    if any(E < 1 for E in experts) or any(b <= a for a, b in zip(experts, experts[1:])):
        raise SettingError(f"--{key}={text}: expert counts must be positive and strictly increasing")
    return experts


def plan_schedule(s, cfg, total_steps, batch_tokens):
    """Stages as [{experts, start, end}] in optimizer steps: explicit --stages, one fixed stage, or the
    scaling-law solver (emo.plan_stages) for this model's active size."""
    experts = stage_experts(s)
    if s.stages:
        fractions = [float(part.split(":")[1]) if ":" in part else math.nan for part in s.stages.split(",")]
        if any(not f > 0 for f in fractions) or abs(sum(fractions) - 1) > 1e-6:
            raise SettingError(f"--stages={s.stages}: each stage needs E:fraction, fractions > 0 summing to 1")
        ends = [round(total_steps * sum(fractions[:i + 1])) for i in range(len(fractions))]
    else:
        n_active = emo.count_params(emo.Config(**{**asdict(cfg), "n_experts": experts[-1]}))[1]
        plan = emo.plan_stages(n_active, total_steps * batch_tokens, experts, cfg.top_k, batch_tokens=batch_tokens)
        ends = [p["end"] // batch_tokens for p in plan]
    starts = [0] + ends[:-1]
    if any(e <= b for b, e in zip(starts, ends)):
        raise SettingError(f"the schedule gives a stage no steps (ends at steps {ends}); give more --total_tokens")
    return [dict(stage=i + 1, experts=E, start=b, end=e) for i, (E, b, e) in enumerate(zip(experts, starts, ends))]


# ---------------------------------------------------------------------------------------------
# Learning rate: warmup-stable-decay (or cosine), re-warmed after each growth
# ---------------------------------------------------------------------------------------------


def collapse_warnings(idle, loads, s, check_cv):
    """Router collapse, per layer: experts that got no token for collapse_steps steps (said once, when
    they reach it), or (when check_cv, at log steps) a load CV above max_load_cv."""
    warnings = []
    for layer, (layer_idle, load) in enumerate(zip(idle, loads)):
        dead = (layer_idle == s.collapse_steps).nonzero().flatten().tolist()
        if dead:
            warnings.append(f"layer {layer}: experts {dead} got no token for {s.collapse_steps} steps")
        cv = (load.std() / load.mean()).item() if check_cv else 0.0
        if cv > s.max_load_cv:
            warnings.append(f"layer {layer}: expert load CV {cv:.2f} > --max_load_cv={s.max_load_cv}")
    return warnings


def previous_experts(stages, stage):
    """E before this stage's growth (the stage's own E in stage 1): experts from there on are the new ones."""
    return stages[stage["stage"] - 2]["experts"] if stage["stage"] > 1 else stage["experts"]


def lr_at(step, s, total_steps, stage):
    """Base schedule times a linear (re-)warmup from the stage's first step (the paper re-warms at growth)."""
    warm_steps = s.warmup_steps if stage["stage"] == 1 else s.rewarm_steps
    warm = min(1.0, (step - stage["start"] + 1) / warm_steps) if warm_steps else 1.0
    low = s.lr * s.min_lr_frac
    if s.lr_schedule == "wsd":
        decay_start = total_steps * (1 - s.decay_frac)
        frac = max(0.0, (step - decay_start) / max(total_steps - decay_start, 1))
        return warm * (s.lr - (s.lr - low) * frac)
    progress = step / max(total_steps - 1, 1)
    return warm * (low + 0.5 * (s.lr - low) * (1 + math.cos(math.pi * progress)))


# ---------------------------------------------------------------------------------------------
# Checkpoints: atomic writes, exact resume
# ---------------------------------------------------------------------------------------------


def save_checkpoint(path, raw, optimizer, s, step):
    """temp file + fsync + rename: a crash mid-write leaves the previous checkpoint intact."""
    state = {"format": CHECKPOINT_FORMAT, "model": raw.state_dict(), "optimizer": optimizer.state_dict(),
             "config": asdict(raw.config), "settings": asdict(s), "step": step,
             "rng": torch.get_rng_state(), "cuda_rng": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []}
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        torch.save(state, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    directory = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(directory)
    finally:
        os.close(directory)


def keep_latest(out_dir, step, n):
    """Retention: with n > 1 the n newest checkpoints stay as stepS.pt, hard links (no second write) of
    what latest.pt was at step S; stage-end checkpoints stageN.pt are always kept."""
    if n > 1:
        link = out_dir / f"step{step}.pt"
        link.unlink(missing_ok=True)
        os.link(out_dir / "latest.pt", link)
    links = sorted(out_dir.glob("step*.pt"), key=lambda p: int(p.stem[4:]))
    for path in links[:max(len(links) - n, 0) if n > 1 else len(links)]:
        path.unlink()


def load_checkpoint(path):
    path = Path(path)
    if path.is_dir():
        path = path / "latest.pt"
    if not path.exists():
        raise SettingError(f"--resume={path}: no such checkpoint")
    try:
        state = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as err:
        raise SettingError(f"--resume={path}: not a readable checkpoint ({type(err).__name__}: corrupt or "
                           f"truncated)") from None
    if not isinstance(state, dict) or state.get("format") != CHECKPOINT_FORMAT:
        raise SettingError(f"--resume={path}: not an emo checkpoint")
    return state


def resumed_settings(state, s, model, given):
    """The checkpoint's settings and model; flags may change only RESUMABLE settings, else one clear line."""
    old = Settings(**state["settings"])
    changed = [k for k in given if k in Settings.__dataclass_fields__ and k not in RESUMABLE
               and getattr(s, k) != getattr(old, k)]
    changed += [k for k in given if k in emo.Config.__dataclass_fields__ and model[k] != state["config"][k]]
    if changed:
        raise SettingError("--resume: these settings differ from the checkpoint's and cannot change mid-run: "
                           + ", ".join(f"{k} (checkpoint {state['config'].get(k, getattr(old, k, None))!r})"
                                       for k in changed))
    for k in (given & RESUMABLE) | PER_INVOCATION:
        setattr(old, k, getattr(s, k))
    return old, state["config"]


def strip_prefixes(state_dict):
    """Checkpoints load with or without DDP (module.) and torch.compile (_orig_mod.) prefixes."""
    out = {}
    for key, value in state_dict.items():
        for prefix in ("module.", "_orig_mod."):
            key = key.replace(prefix, "")
        out[key] = value
    return out


# ---------------------------------------------------------------------------------------------
# The run
# ---------------------------------------------------------------------------------------------


def setup_distributed(device_setting):
    """(rank, world_size, device): torchrun sets RANK/WORLD_SIZE; NCCL on GPU, gloo on CPU."""
    if device_setting == "auto":
        device_setting = "cuda" if torch.cuda.is_available() else "cpu"
    if "RANK" not in os.environ:
        return 0, 1, torch.device(device_setting)
    rank, world, local = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]), int(os.environ["LOCAL_RANK"])
    if device_setting.startswith("cuda"):
        torch.cuda.set_device(local)
        dist.init_process_group("nccl", device_id=torch.device("cuda", local))
        return rank, world, torch.device("cuda", local)
    dist.init_process_group("gloo")
    return rank, world, torch.device("cpu")


def make_optimizer(raw, s, device):
    """AdamW; matrices decay, norms and other vectors do not."""
    params = [p for p in raw.parameters() if p.requires_grad]
    groups = [{"params": [p for p in params if p.dim() >= 2], "weight_decay": s.weight_decay},
              {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=s.lr, betas=(s.beta1, s.beta2), fused=device.type == "cuda")


def wrap(raw, s, device, world):
    """torch.compile and DDP around the model: done once per stage, since growth changes the shapes."""
    model = torch.compile(raw, dynamic=False) if s.compile else raw
    if world > 1:
        # broadcast_buffers=False: each rank keeps its own expert counts until update_router_bias sums them
        model = DDP(model, device_ids=[device.index] if device.type == "cuda" else None, broadcast_buffers=False)
    return model


def autocast(device):
    return torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else nullcontext()


def mean_over_ranks(values, world):
    t = torch.tensor(values, dtype=torch.float64)
    if world > 1:
        dist.all_reduce(t)
        t /= world
    return t.tolist()


@torch.no_grad()
def evaluate(model, data, s, cfg, device, rank, world):
    """Validation loss over eval_batches fixed batches: overall and per domain."""
    model.eval()
    n_domains = len(data.domains)
    sums = torch.zeros(n_domains, dtype=torch.float64, device=device)
    counts = torch.zeros(n_domains, dtype=torch.float64, device=device)
    domain_of = torch.from_numpy(data.doc_domain)
    for i in range(s.eval_batches):
        x, y, doc = data.batch(i, s.batch_size, cfg.seq_len, seed=0, rank=rank, world_size=world, with_docs=True)
        with autocast(device):
            logits, _ = model(x.to(device))
        loss = F.cross_entropy(logits.float().flatten(0, 1), y.to(device).flatten(), reduction="none")
        domain = domain_of[doc.flatten()].to(device)
        sums.index_add_(0, domain, loss.double())
        counts.index_add_(0, domain, torch.ones_like(loss, dtype=torch.float64))
    if world > 1:
        dist.all_reduce(sums)
        dist.all_reduce(counts)
    model.train()
    per_domain = {d: (sums[i] / counts[i]).item() for i, d in enumerate(data.domains) if counts[i] > 0}
    return (sums.sum() / counts.sum()).item(), per_domain


def load_prepare():
    """data/prepare.py as a module (data/ is a folder of scripts, not a package)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("prepare", HERE / "data" / "prepare.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def open_data(s, cfg, rank, world):
    folder = Path(s.data)
    if not (folder / "meta.json").exists() and folder.resolve() == (HERE / "data" / "default").resolve():
        if rank == 0:
            print("preparing the default corpus (python data/prepare.py) ...")
            load_prepare().prepare()
        if world > 1:
            dist.barrier()
    train_data, val_data = emo.Corpus(folder, "train"), emo.Corpus(folder, "val")
    if train_data.vocab_size > cfg.vocab_size:
        raise SettingError(f"--vocab_size={cfg.vocab_size} is smaller than the corpus vocabulary "
                           f"({train_data.vocab_size}, {folder}/meta.json)")
    for name, split in (("train", train_data), ("val", val_data)):
        if split.n_windows(cfg.seq_len) < 1:
            raise SettingError(f"--seq_len={cfg.seq_len} is longer than the {name} split of {folder} "
                               f"({len(split.tokens)} tokens)")
    return train_data, val_data


class Preemption:
    """SIGTERM / SIGINT ask the run to save a checkpoint at the next step boundary and exit cleanly."""

    def __init__(self):
        self.requested = False
        self.previous = {sig: signal.signal(sig, self.request) for sig in (signal.SIGTERM, signal.SIGINT)}

    def request(self, signum, frame):
        self.requested = True

    def restore(self):
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)

    def agreed(self, world, device):
        """All ranks stop at the same step if any one was signalled."""
        if world == 1:
            return self.requested
        flag = torch.tensor([float(self.requested)], device=device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return bool(flag.item())


def run(argv):
    s, model_settings, given = parse(argv)
    resume_state = load_checkpoint(s.resume) if s.resume else None
    if resume_state:
        s, model_settings = resumed_settings(resume_state, s, model_settings, given)
    else:  # a new run starts at the first stage's E
        first = stage_experts(s)[0]
        top_k = model_settings.get("top_k", emo.Config.top_k)
        if isinstance(top_k, int) and top_k > first:
            raise SettingError(f"--top_k={top_k} is not allowed: must be at most the first stage's E={first} "
                               f"(--{'stages' if s.stages else 'experts'})")
        model_settings["n_experts"] = first
    cfg = emo.Config(**model_settings)  # validates the model settings
    world_guess = int(os.environ.get("WORLD_SIZE", "1"))
    validate(s, cfg, world_guess)
    micro_tokens = s.batch_size * cfg.seq_len * world_guess
    batch_tokens = s.batch_tokens or micro_tokens
    accum = batch_tokens // micro_tokens
    total_steps = s.total_tokens // batch_tokens
    stages = plan_schedule(s, cfg, total_steps, batch_tokens)

    rank, world, device = setup_distributed(s.device)
    master = rank == 0
    log = print if master else (lambda *a, **k: None)
    out_dir = Path(s.out_dir)
    if master:
        out_dir.mkdir(parents=True, exist_ok=True)
        (out_dir / "config.json").write_text(json.dumps({"settings": asdict(s), "model": asdict(cfg),
                                                         "stages": stages}, indent=1))
    log(json.dumps({"settings": asdict(s), "model": asdict(cfg)}))
    log("stages: " + ", ".join(f"E={st['experts']} steps {st['start']}-{st['end']}" for st in stages)
        + f" ({total_steps} steps of {batch_tokens} tokens, {accum} micro-batches each)")
    train_data, val_data = open_data(s, cfg, rank, world)

    torch.manual_seed(s.seed)
    emo.keep_freed_memory()
    raw = emo.Transformer(cfg).to(device)
    optimizer = make_optimizer(raw, s, device)
    step = 0
    if resume_state:
        raw.load_state_dict(strip_prefixes(resume_state["model"]))
        optimizer.load_state_dict(resume_state["optimizer"])
        step = resume_state["step"]
        torch.set_rng_state(resume_state["rng"])
        if device.type == "cuda" and resume_state["cuda_rng"]:
            torch.cuda.set_rng_state_all(resume_state["cuda_rng"])
        log(f"resumed from step {step} (E={raw.config.n_experts})")
    model = wrap(raw, s, device, world)
    if master and resume_state:
        trim_metrics(out_dir / "metrics.jsonl", step)
    metrics = open(out_dir / "metrics.jsonl", "a") if master else None

    def record(kind, **values):
        if metrics:
            metrics.write(json.dumps({"kind": kind, **values}) + "\n")
            metrics.flush()

    preemption = Preemption()
    idle = torch.zeros(0)  # per layer and expert: steps since it last got a token
    t_last, tokens_since, start_time, start_step = time.time(), 0, time.time(), step
    cost = None  # this stage's training time, tokens and peak memory in this process (after a resume: since it)
    try:
        while step < total_steps:
            stage = next(st for st in stages if st["start"] <= step < st["end"])
            if cost is None or cost["stage"] != stage["stage"]:
                cost = dict(stage=stage["stage"], seconds=0.0, tokens=0, tracked=reset_peak_memory(device))
            if raw.config.n_experts != stage["experts"]:  # the first step of a new stage: grow
                t0 = time.time()
                old = raw.config.n_experts
                emo.grow_experts(raw, stage["experts"], init=s.growth_init)
                emo.grow_optimizer(optimizer, s.growth_optimizer)
                model = wrap(raw, s, device, world)
                seconds = time.time() - t0
                val, _ = evaluate(model, val_data, s, cfg, device, rank, world)  # the spike growth itself causes
                log(f"step {step}: grew E {old} -> {stage['experts']} ({s.growth_init} init, optimizer "
                    f"{s.growth_optimizer}) in {seconds:.2f}s; val loss right after: {val:.4f}")
                record("growth", step=step, stage=stage["stage"], experts_from=old, experts=stage["experts"],
                       init=s.growth_init, seconds=seconds, val_loss=val)
            lr = lr_at(step, s, total_steps, stage)
            t0 = time.time()
            loss_value, ce_value, grad_norm, loads = train_step(model, raw, optimizer, train_data, s, step, lr, accum,
                                                                rank, world, device)
            cost["seconds"] += time.time() - t0  # train_step ends on .item(): the GPU work is done
            cost["tokens"] += batch_tokens
            step += 1
            tokens_since += batch_tokens
            if not math.isfinite(loss_value) or not math.isfinite(grad_norm.item()):
                last = out_dir / "latest.pt"
                raise TrainingError(f"non-finite loss or gradient at step {step}, stage {stage['stage']} "
                                    f"(E={stage['experts']}); last good checkpoint: "
                                    f"{last if last.exists() else 'none yet'} (resume it with a lower --lr)")
            idle = (idle + 1) * (loads == 0) if idle.shape == loads.shape else (loads == 0).long()
            for warning in collapse_warnings(idle, loads, s, check_cv=step % s.log_interval == 0):
                log(f"step {step}: warning: {warning}")
                record("warning", step=step, message=warning)
            record("step", step=step, stage=stage["stage"], experts=stage["experts"], loss=loss_value, ce=ce_value,
                   lr=lr, grad_norm=grad_norm.item(), tokens=step * batch_tokens,
                   load_cv=(loads.std(dim=1) / loads.mean(dim=1)).mean().item(),
                   new_share=(loads[:, previous_experts(stages, stage):].sum() / loads.sum()).item())
            if step % s.log_interval == 0 or step == total_steps:
                elapsed = time.time() - t_last
                tps = tokens_since / elapsed
                util = emo.mfu(tps / world, raw.config, device)
                eta = (time.time() - start_time) / (step - start_step) * (total_steps - step)
                log(f"step {step}/{total_steps} | stage {stage['stage']}/{len(stages)} E={stage['experts']} | loss "
                    f"{loss_value:.4f} | lr {lr:.2e} | {tps:,.0f} tok/s | mfu {'-' if util is None else f'{util:.1%}'}"
                    f" | eta {eta / 60:.1f} min")
                t_last, tokens_since = time.time(), 0
            stage_end = step == stage["end"]
            if step % s.eval_interval == 0 or stage_end:
                val, per_domain = evaluate(model, val_data, s, cfg, device, rank, world)
                log(f"step {step}: val loss {val:.4f} | " + " ".join(f"{d} {v:.3f}" for d, v in per_domain.items()))
                record("eval", step=step, stage=stage["stage"], experts=stage["experts"], val_loss=val,
                       val_loss_per_domain=per_domain)
                if stage_end:
                    n_active = raw.num_params(active=True)
                    record("stage", step=step, stage=stage["stage"], experts=stage["experts"], top_k=cfg.top_k,
                           n_active=n_active,
                           params_total=raw.num_params(), tokens=step * batch_tokens, val_loss=val,
                           seconds=time.time() - start_time, train_seconds=cost["seconds"],
                           tokens_per_second=cost["tokens"] / cost["seconds"],
                           peak_memory=peak_memory(device) if cost["tracked"] else None,
                           state_memory=state_memory(raw, optimizer))
            stop = s.stop_at and step >= s.stop_at
            preempted = preemption.agreed(world, device)
            periodic = s.checkpoint_interval and step % s.checkpoint_interval == 0
            if master and (periodic or stage_end or stop or preempted or step == total_steps):
                save_checkpoint(out_dir / "latest.pt", raw, optimizer, s, step)
                keep_latest(out_dir, step, s.keep_latest)
                if stage_end:  # a hard link: the same checkpoint, kept, without a second write
                    stage_path = out_dir / f"stage{stage['stage']}.pt"
                    stage_path.unlink(missing_ok=True)
                    os.link(out_dir / "latest.pt", stage_path)
            if stop or preempted:
                log(f"stopped at step {step} ({'signal' if preempted else '--stop_at'}); resume with: "
                    f"python train.py --resume={out_dir}")
                break
        if master and step == total_steps and s.sample_tokens:
            log("sample: " + repr(sample(raw, s.sample_tokens, device)))
        if master and step == total_steps:  # record() flushed every line: the plot reads them all
            log(plot_losses({out_dir.name: out_dir}, out_dir / "loss.png"))
        if world > 1:  # wait for rank 0's sample and plot: a rank that tears down gloo early can abort
            dist.barrier()
    finally:  # also when the run stops on an error: give back the signal handlers, close the log
        preemption.restore()
        if metrics:
            metrics.close()
        if world > 1:
            dist.destroy_process_group()
    return raw


def train_step(model, raw, optimizer, data, s, step, lr, accum, rank, world, device):
    """One optimizer step over `accum` micro-batches, then the balancing update.
    Returns the loss and cross-entropy (averaged over ranks), the gradient norm and the expert loads."""
    for group in optimizer.param_groups:
        group["lr"] = lr
    loss_sum = ce_sum = 0.0
    for micro in range(accum):
        x, y = data.batch(step * accum + micro, s.batch_size, raw.config.seq_len, s.seed, rank, world)
        sync = micro == accum - 1 or world == 1  # DDP all-reduces gradients on the last micro-batch only
        with (nullcontext() if sync else model.no_sync()), autocast(device):
            _, loss = model(x.to(device), y.to(device))
        (loss / accum).backward()
        loss_sum += loss.detach()
        ce_sum += raw.last_losses["ce"]
    grad_norm = torch.nn.utils.clip_grad_norm_(raw.parameters(), s.grad_clip or float("inf"))
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    loads = emo.update_router_bias(raw)
    loss_value, ce_value = mean_over_ranks([float(loss_sum) / accum, float(ce_sum) / accum], world)
    return loss_value, ce_value, grad_norm, loads


def reset_peak_memory(device):
    """Start a peak-memory window: CUDA's allocator peak, or on Linux the process's peak resident set
    (writing 5 to /proc/self/clear_refs resets VmHWM). Returns False where neither can be reset."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        return True
    emo.release_freed_memory()  # else the window starts at the heap the last stage kept
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def peak_memory(device):
    """Bytes since reset_peak_memory: peak allocated tensors on CUDA; peak RSS of the whole process on CPU
    (the Python and torch runtime included, so compare CPU values as differences)."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device)
    status = Path("/proc/self/status").read_text()
    return int(status.split("VmHWM:")[1].split()[0]) * 1024  # reported in kB


def state_memory(raw, optimizer):
    """Bytes of weights + their gradients + optimizer moments: the memory growth adds to. Gradients are
    counted at their size during the step (zero_grad frees them between steps)."""
    params = [p for p in raw.parameters() if p.requires_grad]
    moments = [v for st in optimizer.state.values() for v in st.values() if torch.is_tensor(v) and v.dim()]
    return sum(2 * p.numel() * p.element_size() for p in params) + sum(v.numel() * v.element_size() for v in moments)


def read_metrics(folder):
    """A run folder's metrics.jsonl as a list of records (step, eval, growth, stage, warning)."""
    return [json.loads(line) for line in (Path(folder) / "metrics.jsonl").read_text().splitlines() if line.strip()]


def plot_losses(runs, png):
    """Validation loss against tokens for each run folder in `runs` ({label: folder}), a dotted line at
    each growth. matplotlib is optional: without it this writes nothing and says so."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return f"no {png}: matplotlib is not installed (optional: pip install matplotlib)"
    fig, ax = plt.subplots(figsize=(8, 5))
    lowest = float("inf")
    for i, (label, folder) in enumerate(runs.items()):
        records = read_metrics(folder)
        tokens = {0: 0, **{r["step"]: r["tokens"] for r in records if r["kind"] == "step"}}
        evals = [r for r in records if r["kind"] == "eval"]
        color = f"C{i % 10}"
        ax.plot([tokens[r["step"]] for r in evals], [r["val_loss"] for r in evals], color=color, label=label)
        for growth in (r for r in records if r["kind"] == "growth"):
            ax.axvline(tokens[growth["step"]], color=color, linestyle=":", linewidth=1)
        lowest = min([lowest] + [r["val_loss"] for r in evals])
    ax.set(xlabel="tokens", ylabel="validation loss", title="validation loss (dotted: expert growth)")
    ax.set_ylim(lowest - 0.1, lowest + 2.5)  # the first evals (~10.8) would flatten the rest
    ax.legend()
    fig.savefig(png, dpi=120, bbox_inches="tight")
    plt.close(fig)
    return f"wrote {png}"


def logged_by(record, step):
    """Was this record written before the checkpoint at `step`? A growth at `step` comes right after it."""
    return record["step"] < step if record["kind"] == "growth" else record["step"] <= step


def trim_metrics(path, step):
    """On resume, drop what the stopped run logged after its checkpoint at `step`: it is about to be redone
    (a growth at `step` itself happened after the checkpoint was written)."""
    if not path.exists():
        return
    kept = [line for line in path.read_text().splitlines() if line.strip() and logged_by(json.loads(line), step)]
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text("".join(line + "\n" for line in kept))
    os.replace(tmp, path)


def sample(raw, n_tokens, device):
    enc = load_prepare().gpt2_encoding()
    prompt = torch.tensor([enc.encode_ordinary("def ")], device=device)
    raw.eval()
    with autocast(device):
        out = raw.generate(prompt, n_tokens, temperature=0.8, top_k=50)
    raw.train()
    return enc.decode([t for t in out[0].tolist() if t < enc.n_vocab])


def main(argv=None):
    try:
        return run(sys.argv[1:] if argv is None else argv)
    except (SettingError, ValueError, TrainingError) as err:
        sys.exit(f"train.py: {err}")


if __name__ == "__main__":
    main()

"""Train an MoE whose expert pool grows in stages (EMO-progressive), on CPU, one GPU, or many via torchrun.

python train.py                                    # the default: E = 2 -> 4 -> ... -> 32, ~7 minutes on 2 CPU cores
python train.py --config=configs/gpu-8x.json       # settings from a JSON file; flags override it
torchrun --standalone --nproc_per_node=8 train.py --config=configs/gpu-8x.json
python train.py --resume=runs/default              # continue exactly where a run stopped
python train.py --schedule=fixed --experts=8       # the fixed-E baseline
python train.py --help                             # every setting, its default and meaning

Every Settings and emo.Config field is a --key=value flag; paths are relative to the working directory.
The run folder (--out_dir) gets config.json, metrics.jsonl (one record per step, eval, growth and stage
end), latest.pt and one checkpoint per stage; one run at a time owns it (runs.py). Exit status: 0 the run
finished, 75 it stopped early and can be resumed (a signal or --stop_at), 1 an error (printed as one line).
"""

import json
import math
import os
import shlex
import sys
import time
import uuid
from contextlib import nullcontext
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch
import torch.distributed as dist
from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard
from torch.distributed.tensor import DTensor, distribute_tensor
from torch.nn.parallel import DistributedDataParallel as DDP

import emo
import report
import runs
import flags
import folders
from data.corpus import DEFAULT_FOLDER, Corpus, DataError, fingerprint, prepare, vocabulary
from emo import SettingError, require
from runs import EXIT_STOPPED, TrainingError


@dataclass
class Settings:
    data: str = "data/default"  # a corpus folder made by data/prepare.py
    out_dir: str = "runs/default"  # the run folder: config, metrics, checkpoints
    resume: str = ""  # a checkpoint, or a run folder (its latest.pt)
    config: str = ""  # a JSON file of settings; flags override it
    # the schedule
    total_tokens: int = 4_000_000  # tokens the whole run trains on, all stages together
    schedule: str = "progressive"  # "progressive" (stage budgets from the scaling law) or "fixed"
    experts: str = "2,4,8,16,32"  # E per stage; the fixed schedule uses the last
    stages: str = ""  # explicit stages "E:fraction,...", e.g. "8:0.235,16:0.095,...": overrides the solver
    law: str = ""  # the solver's scaling law: a JSON file of coefficients (plan.py --save_law); empty: Table 3's
    grow_after: int = 2  # the law's split up to the end of this stage, then every later E at once; 0: the law's
    # split throughout (Table 3 was fitted on 100M+-parameter models; at the default's 2M a larger pool pays early)
    replan: bool = True  # closed loop: at each stage end refit the law to this run's evals, move the later ends
    # (the law's own split only, --grow_after=0: an explicit --stages split or --grow_after's is kept as given)
    replan_params: str = "auto"  # what each re-plan may refit: auto, every coefficient the run's evals determine
    # (emo.identified); or names, e.g. delta (what a larger pool is worth: alone, it also takes the early fall)
    growth_init: str = "silent"  # silent (function-preserving), gaussian (the paper), copy, upcycle: emo.grow_experts
    growth_optimizer: str = "keep"  # keep the old experts' Adam moments, or reset them all (the paper)
    # optimisation
    batch_size: int = 16  # sequences per micro-batch per process
    batch_tokens: int = 0  # tokens per optimizer step over all processes (0: one micro-batch per process)
    lr: float = 3e-3  # peak learning rate (AdamW)
    min_lr_frac: float = 0.0  # the LR decays to lr * min_lr_frac
    lr_schedule: str = "wsd"  # warmup-stable-decay (the paper) or cosine
    warmup_steps: int = 20  # linear warmup at the start of the run
    rewarm_steps: int = 0  # LR re-warm after each growth (the paper: 500 of ~240K steps; silent growth needs none)
    decay_frac: float = 0.1  # wsd: linear decay over the last 10% of steps (the paper)
    weight_decay: float = 0.1  # AdamW, on matrices only
    beta1: float = 0.9  # AdamW's first-moment decay
    beta2: float = 0.95  # AdamW's second-moment decay
    grad_clip: float = 1.0  # 0: no clipping
    # running
    device: str = "auto"  # auto, cpu, cuda, cuda:N
    dtype: str = "auto"  # autocast: bf16 or fp32 (auto: bf16 on CUDA, fp32 on CPU)
    compile: bool = False  # torch.compile the model (the GPU path; recompiled at each growth)
    shard: str = "ddp"  # with torchrun: ddp (each process holds the whole model) or fsdp (sharded; fixed E)
    # (FSDP2: parameters, gradients and AdamW moments split over the processes, for models DDP cannot hold)
    seed: int = 0  # initial weights and data order: one seed, one run
    eval_interval: int = 100  # steps between validation evals (and at every stage end)
    eval_batches: int = 32  # 65K tokens at the default batch: enough to tell runs apart (RESULTS.md)
    log_interval: int = 10  # steps between progress lines
    sample_tokens: int = 48  # length of the text sample printed at the end (0: none)
    stop_at: int = 0  # save and exit after this many steps (a time-limited job); resume later
    checkpoint_interval: int = 100  # steps between latest.pt saves (also at every stage end and the end)
    keep_latest: int = 1  # checkpoints kept besides stage ends: with N > 1 the N newest as stepS.pt too
    collapse_steps: int = 200  # warn when an expert of a layer got no token for this many steps
    max_load_cv: float = 2.0  # warn when a layer's expert-load coefficient of variation exceeds this


SCHEDULES, LR_SCHEDULES, DTYPES = ("progressive", "fixed"), ("wsd", "cosine"), ("auto", "bf16", "fp32")
SHARDS = ("ddp", "fsdp")
# settings a resumed run may change; anything else must match the checkpoint. lr and grad_clip may change
# so that a run that diverged can go on from its last checkpoint more gently.
RESUMABLE = {"resume", "config", "device", "dtype", "compile", "shard", "eval_interval", "eval_batches", "log_interval",
             "sample_tokens", "stop_at", "checkpoint_interval", "keep_latest", "out_dir", "collapse_steps",
             "max_load_cv", "lr", "grad_clip"}
PER_INVOCATION = {"resume", "config", "stop_at"}  # orders for this command only, never inherited on resume
OLDER = {"grow_after": 0, "shard": "ddp"}  # settings added later: what a checkpoint without them ran with


# --- Settings: flags and config files -> validated Settings + emo.Config ------------------------------------


def parse(argv):
    """--key=value flags (and a --config JSON file) -> (Settings, model settings dict, keys given)."""
    typed = flags.parse_flags(argv, __doc__, (Settings, emo.Config), same_thing=("stages", "experts"))
    if "n_experts" in typed:
        raise SettingError("--n_experts is set by the schedule: give the stage list --experts=2,4,8 instead")
    settings = Settings(**{k: v for k, v in typed.items() if k in Settings.__dataclass_fields__})
    model = {k: v for k, v in typed.items() if k in emo.Config.__dataclass_fields__}  # the rest: Config's
    return settings, model, set(typed)


def validate(s, cfg, world, n_stages):
    """Everything that can be checked before touching data or a device: one line naming the setting."""
    for key, allowed in (("schedule", SCHEDULES), ("lr_schedule", LR_SCHEDULES), ("growth_init", emo.GROWTH_INITS),
                         ("growth_optimizer", emo.OPTIMIZER_MODES), ("dtype", DTYPES), ("shard", SHARDS)):
        require(getattr(s, key) in allowed, f"--{key}", getattr(s, key), f"one of {', '.join(allowed)}")
    for keys, ok, allowed in (  # NaN fails every comparison, so each range check refuses it
            (("total_tokens", "batch_size", "eval_interval", "eval_batches", "log_interval", "collapse_steps",
              "keep_latest"), lambda v: v >= 1, "a positive integer"),
            (("batch_tokens", "warmup_steps", "rewarm_steps", "sample_tokens", "stop_at", "checkpoint_interval",
              "grow_after"),
             lambda v: v >= 0, "an integer >= 0"),
            (("seed",), lambda v: 0 <= v < 2**32, "an integer in [0, 2**32)"),
            (("lr", "max_load_cv"), lambda v: math.isfinite(v) and v > 0, "a finite number > 0"),
            (("weight_decay", "grad_clip"), lambda v: math.isfinite(v) and v >= 0, "a finite number >= 0"),
            (("min_lr_frac", "decay_frac"), lambda v: 0 <= v <= 1, "in [0, 1]"),
            (("beta1", "beta2"), lambda v: 0 <= v < 1, "in [0, 1)")):
        for key in keys:
            require(ok(getattr(s, key)), f"--{key}", getattr(s, key), allowed)
    require(s.out_dir != "", "--out_dir", s.out_dir, "a folder path (it is empty)")
    free = s.replan_params.split(",")
    require(s.replan_params == "auto" or set(free) <= set(emo.LAW_COEFFICIENTS) and len(set(free)) == len(free),
            "--replan_params", s.replan_params,
            f"auto, or names of the law's coefficients, each once: {', '.join(emo.LAW_COEFFICIENTS)}")
    micro_tokens, step_tokens = batch_tokens_of(s, cfg, world)
    require(s.batch_tokens % micro_tokens == 0, "--batch_tokens", s.batch_tokens,
            f"a multiple of batch_size * seq_len * processes = {s.batch_size}*{cfg.seq_len}*{world} = {micro_tokens}")
    require(s.total_tokens >= step_tokens * n_stages, "--total_tokens", s.total_tokens,
            f"at least one optimizer step per stage: {n_stages} x {step_tokens} tokens (" +
            ("--batch_tokens" if s.batch_tokens else f"--batch_size * --seq_len * processes = {s.batch_size} * "
             f"{cfg.seq_len} * {world}") + "); or make the batch smaller")
    if n_stages > 1:  # a fixed run never grows: any init is fine there
        emo.check_growth_init(s.growth_init, cfg.router, "--growth_init")
    runs.resolve_device(s.device)


def batch_tokens_of(s, cfg, world):
    """(tokens of one micro-batch over all processes, tokens of one optimizer step): --batch_tokens, or one
    micro-batch per process."""
    micro_tokens = s.batch_size * cfg.seq_len * world
    return micro_tokens, s.batch_tokens or micro_tokens


def memory_need(cfg, windows, bf16, world, sharded):
    """Bytes one process holds while it trains cfg on micro-batches of `windows` windows: fp32 weights,
    gradients and AdamW moments (16 bytes a parameter; 1/world of them under FSDP2), the activations of one
    micro-batch (emo.activation_bytes), and under bf16 the weights' bf16 copies: all of them under DDP
    (autocast casts each weight once per step), under FSDP2 the gathered bf16 weights of two blocks (the one
    running and the next, prefetched) and of the root (the embedding)."""
    total = emo.count_params(cfg)[0]
    states = emo.BYTES_PER_PARAM * total / (world if sharded else 1)
    root = cfg.vocab_size * cfg.d_model
    copies = 0 if not bf16 else 2 * total if not sharded else 2 * (root + 2 * (total - root) / cfg.n_layer)
    return dict(states=states, activations=emo.activation_bytes(cfg, windows, bf16), copies=copies)


def check_memory(cfg, s, world):
    """Refuse, before anything is allocated, a run whose weights, gradients, Adam moments and one micro-batch's
    activations (memory_need) exceed the memory of the device each process trains on. On the CPU the
    processes of this machine share its memory."""
    device = torch.device(runs.resolve_device(s.device))
    if device.type == "cuda":
        have, where, sharing = (torch.cuda.get_device_properties(device).total_memory,
                                torch.cuda.get_device_name(device), 1)
    else:
        have, where = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"), "this machine's memory"
        sharing = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
    sharded = s.shard == "fsdp" and world > 1
    bf16 = runs.autocast_dtype(s.dtype, device) == torch.bfloat16
    need = sum(memory_need(cfg, s.batch_size, bf16, world, sharded).values()) * sharing
    require(need <= have, "the model", f"{emo.count_params(cfg)[0]:.3g} parameters at E={cfg.n_experts}",
            f"one whose weights, gradients, Adam moments and activations ({need / 2**30:,.1f} GiB"
            f"{f' for {sharing} processes' if sharing > 1 else ''}{', sharded' if sharded else ''}) fit {where} "
            f"({have / 2**30:,.1f} GiB): make it smaller (--d_model, --n_layer, --d_expert, --experts) or its "
            f"micro-batch (--batch_size)" + ("" if sharded or world == 1 else ", or shard it over the processes "
                                             "(--shard=fsdp)"))


def parse_stages(s):
    """train.py's --stages (E:fraction,...) or --experts (E,...) -> (the E of each stage, fractions or None).
    s: anything with train.py's stages, experts and schedule settings."""
    key, text = ("stages", s.stages) if s.stages else ("experts", s.experts)
    try:
        parts = [part.split(":") for part in text.split(",")]
        experts = [int(part[0]) for part in parts]
        fractions = [float(part[1]) if len(part) == 2 else math.nan for part in parts] if s.stages else None
    except ValueError:
        raise SettingError(f"--{key}={text}: expected comma-separated "
                           f"{'E:fraction' if s.stages else 'integers'}") from None
    if s.stages and s.schedule == "fixed":
        raise SettingError("--stages gives a progressive schedule: --schedule=fixed takes --experts=E instead")
    if any(E < 1 for E in experts) or any(b <= a for a, b in zip(experts, experts[1:])):
        raise SettingError(f"--{key}={text}: expert counts must be positive and strictly increasing")
    if s.schedule == "fixed":
        experts = experts[-1:]
    if fractions and (any(not f > 0 for f in fractions) or abs(sum(fractions) - 1) > 1e-6):
        raise SettingError(f"--stages={s.stages}: each stage needs E:fraction, fractions > 0 summing to 1")
    return experts, fractions


def plan_schedule(s, cfg, batch_tokens, experts, fractions, law=None):
    """The run's stages in optimizer steps: explicit --stages fractions, one fixed stage, or the scaling-law
    solver (emo.plan_stages, with law: a ScalingLaw, default Table 3's) for this model's active size, kept up
    to the end of stage --grow_after, after which every later E comes at once, one step apart."""
    total_steps = s.total_tokens // batch_tokens
    if fractions:
        ends = [round(total_steps * sum(fractions[:i + 1])) for i in range(len(fractions))]
    else:
        n_active = emo.law_active_params(emo.Config(**{**asdict(cfg), "n_experts": experts[-1]}))
        planned = emo.plan_stages(n_active, total_steps * batch_tokens, experts, cfg.top_k, law=law,
                                  batch_tokens=batch_tokens, grow_after=s.grow_after)
        ends = [p["end"] // batch_tokens for p in planned]
    if any(e <= b for b, e in zip([0] + ends[:-1], ends)):
        raise SettingError(f"the schedule gives a stage no steps (ends at steps {ends}); give more --total_tokens")
    return emo.stages_at(experts, ends)


# --- Learning rate: warmup-stable-decay (or cosine), re-warmed after each growth ----------------------------


def lr_at(step, s, total_steps, stage):
    """Base schedule times the run's linear warmup from step 0 and, after a growth, a linear re-warm from the
    stage's first step (the paper re-warms at growth). A growth inside the warmup does not cut it short."""
    warm = min(1.0, (step + 1) / s.warmup_steps) if s.warmup_steps else 1.0
    if stage.index > 1 and s.rewarm_steps:
        warm = min(warm, (step - stage.start + 1) / s.rewarm_steps)
    low = s.lr * s.min_lr_frac
    if s.lr_schedule == "wsd":
        decay_start = total_steps * (1 - s.decay_frac)
        frac = max(0.0, (step - decay_start) / max(total_steps - decay_start, 1))
        return warm * (s.lr - (s.lr - low) * frac)
    progress = step / max(total_steps - 1, 1)
    return warm * (low + 0.5 * (s.lr - low) * (1 + math.cos(math.pi * progress)))


# --- The model on its device, its optimizer, the data and evaluation ----------------------------------------


def size_for_corpus(model_settings, folder):
    """The model's vocabulary and end-of-text id default to the corpus's (from its meta.json), so nothing has
    to be kept in sync by hand; the vocabulary is padded to a multiple of 64 (faster matmuls)."""
    vocab, eot = vocabulary(folder)
    model_settings.setdefault("vocab_size", -(-vocab // 64) * 64)
    model_settings.setdefault("eot_id", eot)


def open_data(s, cfg, rank):
    """The train and val splits of --data, checked against the model (vocabulary, end-of-text id, window
    length); the default corpus is prepared if missing (by rank 0, the others wait)."""
    folder = Path(s.data)
    if not (folder / "meta.json").exists() and folder.resolve() == DEFAULT_FOLDER.resolve():
        why = folders.replace_problem(folder, "corpus")
        if why:
            raise DataError(f"--data={folder} holds no corpus, and the default one is not prepared there: it {why}; "
                            f"move it away, or give --data=PATH")
        if rank == 0:
            print("preparing the default corpus (python data/prepare.py) ...")
            prepare()
        if dist.is_initialized():
            dist.barrier()
    train_data, val_data = Corpus(folder, "train"), Corpus(folder, "val")
    if train_data.vocab_size > cfg.vocab_size:
        raise SettingError(f"--vocab_size={cfg.vocab_size} is smaller than the corpus vocabulary "
                           f"({train_data.vocab_size}, {folder}/meta.json)")
    if cfg.eot_id != train_data.eot_id:
        raise SettingError(f"--eot_id={cfg.eot_id} is not the corpus's end-of-text id {train_data.eot_id} "
                           f"({folder}/meta.json): documents would be split in the wrong places")
    for name, split in (("train", train_data), ("val", val_data)):
        if split.n_windows(cfg.seq_len) < 1:
            raise SettingError(f"--seq_len={cfg.seq_len} is longer than the {name} split of {folder} "
                               f"({len(split.tokens)} tokens)")
    return train_data, val_data


def epochs_warning(s, train_data):
    """A run that reads more tokens than the train split holds repeats it: said before training, not found later."""
    epochs = s.total_tokens / len(train_data.tokens)
    if epochs > 1:
        return (f"--total_tokens={s.total_tokens:,} is {epochs:.1f} epochs of {s.data}'s train split "
                f"({len(train_data.tokens):,} tokens): the data repeats")
    return None


def make_optimizer(raw, s, device):
    """AdamW; matrices decay, norms and other vectors do not."""
    params = [p for p in raw.parameters() if p.requires_grad]
    groups = [{"params": [p for p in params if p.dim() >= 2], "weight_decay": s.weight_decay},
              {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=s.lr, betas=(s.beta1, s.beta2), fused=device.type == "cuda")


def wrap(raw, s, device):
    """DDP and torch.compile around the model, done once per stage since growth changes the shapes; or, with
    --shard=fsdp under torchrun, FSDP2 in place (shard)."""
    if s.compile:
        # drop the last stage's graphs: dead after growth, and they count toward dynamo's recompile limit
        # (8 per function), past which a 5-stage run's last stages silently ran uncompiled
        torch._dynamo.reset()
    if dist.is_initialized() and s.shard == "fsdp":
        return shard(raw, s, device)
    model = raw
    if dist.is_initialized():
        # broadcast_buffers=False: each rank keeps its own expert counts until update_router_bias sums them
        model = DDP(raw, device_ids=[device.index] if device.type == "cuda" else None, broadcast_buffers=False)
    # compile around DDP, not inside it: dynamo then splits the graph at DDP's gradient buckets, so a bucket's
    # all-reduce overlaps the rest of the backward (inside, the whole backward is one node that DDP waits for)
    return torch.compile(model, dynamic=False) if s.compile else model


def shard(raw, s, device):
    """FSDP2 (torch's fully_shard, what torchtitan builds on): each block, then the root (the embedding it
    shares with the output), keeps 1/world of its parameters, gradients and AdamW moments; a forward gathers a
    block's parameters just before it runs and frees them after, and gradients are reduce-scattered. Under
    bf16 the gathered weights are bf16 and gradients reduce in fp32; each block compiles on its own. raw is
    sharded in place: make the optimizer after this."""
    bf16 = runs.autocast_dtype(s.dtype, device) == torch.bfloat16
    policy = (MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) if bf16
              else MixedPrecisionPolicy())
    for block in raw.blocks:
        if s.compile:
            block.compile(dynamic=False)
        fully_shard(block, mp_policy=policy)
    fully_shard(raw, mp_policy=policy)
    return raw


@torch.no_grad()
def evaluate(model, data, s, cfg, device, dtype, rank, world, batches=None):
    """Validation loss over the first `batches` (default eval_batches) fixed batches, overall and per domain: nats
    per token ("loss") and bits per byte ("bpb": the loss of the tokens that stand for text / (ln 2 * their
    UTF-8 bytes), which compares across tokenizers)."""
    model.eval()
    sums = torch.zeros(4, len(data.domains), dtype=torch.float64, device=device)  # loss, tokens, text loss, bytes
    domain_of, bytes_of = torch.from_numpy(data.doc_domain), data.token_bytes()
    for i in range(batches or s.eval_batches):
        x, y, doc = data.batch(i, s.batch_size, cfg.seq_len, seed=0, rank=rank, world_size=world, with_docs=True)
        with runs.autocast(device, dtype):
            loss = model(x.to(device), y.to(device), reduction="none")["ce"].flatten().double()
        n_bytes = bytes_of[y.flatten()].to(device).double()
        domain = domain_of[doc.flatten()].to(device)
        for row, values in enumerate((loss, torch.ones_like(loss), loss * (n_bytes > 0), n_bytes)):
            sums[row].index_add_(0, domain, values)
    if dist.is_initialized():
        dist.all_reduce(sums)
    model.train()
    loss, tokens, text_loss, n_bytes = sums
    seen = [i for i in range(len(data.domains)) if tokens[i] > 0]
    bpb = lambda t, b: (t / (math.log(2) * b)).item()
    return dict(loss=(loss.sum() / tokens.sum()).item(), bpb=bpb(text_loss.sum(), n_bytes.sum()),
                loss_per_domain={data.domains[i]: (loss[i] / tokens[i]).item() for i in seen},
                bpb_per_domain={data.domains[i]: bpb(text_loss[i], n_bytes[i]) for i in seen})


# --- The training step --------------------------------------------------------------------------------------


class NonFiniteLoss(TrainingError):
    """The loss or the gradient norm is NaN or infinite: the step was not taken."""


def train_step(model, optimizer, micro_batches, lr, grad_clip, dtype):
    """One optimizer step: forward and backward over the micro-batches (DDP syncs gradients on the last),
    gradient clipping, AdamW, then the balancing update. A non-finite loss or gradient raises NonFiniteLoss
    before anything changes, so the weights stay those of the last good step.
    micro_batches: [(x, y)] on the model's device. Returns (loss, cross-entropy, gradient norm: floats, expert
    loads [n_layer, E] on the device), the losses averaged over micro-batches and ranks."""
    raw = emo.unwrap(model)
    for group in optimizer.param_groups:
        group["lr"] = lr
    loss_sum = ce_sum = 0.0
    for i, (x, y) in enumerate(micro_batches):
        last = i == len(micro_batches) - 1
        if isinstance(model, FSDPModule):  # reduce-scatter the gradients once, after the last micro-batch
            model.set_requires_gradient_sync(last)
        ddp = getattr(model, "_orig_mod", model)  # DDP, compiled or not
        sync = ddp.no_sync() if isinstance(ddp, DDP) and not last else nullcontext()
        with sync, runs.autocast(x.device, dtype):
            losses = model(x, y)
        (losses["loss"] / len(micro_batches)).backward()
        loss_sum += losses["loss"].detach()
        ce_sum += losses["ce"].detach()
    grad_norm = torch.nn.utils.clip_grad_norm_(raw.parameters(), grad_clip or float("inf"))
    if isinstance(grad_norm, DTensor):  # sharded gradients: the norm over all shards
        grad_norm = grad_norm.full_tensor()
    losses = runs.mean_over_ranks(torch.stack([loss_sum, ce_sum]).double() / len(micro_batches))
    # the step's one wait for the device: whether to take the step depends on these values
    loss_value, ce_value, grad_norm = torch.cat([losses, grad_norm.detach().double().reshape(1)]).tolist()
    if not (math.isfinite(loss_value) and math.isfinite(grad_norm)):
        optimizer.zero_grad(set_to_none=True)
        for moe in raw.moe_layers():  # forget this step's routing counts too: nothing of it remains
            moe.router.expert_counts.zero_()
        raise NonFiniteLoss(f"loss {loss_value}, gradient norm {grad_norm}")
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    loads = emo.update_router_bias(raw)
    return loss_value, ce_value, grad_norm, loads


# --- The run: stage by stage, step by step ------------------------------------------------------------------


def train(s, cfg, stages, world, resume, law):
    """Train to the end of the last stage, or until a signal or --stop_at: stage by stage, growing the
    experts at each stage's first step (grow), then step by step, the learning rate re-warming after each
    growth (lr_at). Returns (the model, whether the run finished).
    resume: None, or a runs.Resume; law: the ScalingLaw the closed loop starts each refit from."""
    micro_tokens, batch_tokens = batch_tokens_of(s, cfg, world)
    accum, total_steps = batch_tokens // micro_tokens, stages[-1].end
    new = resume is None or resume.branching
    with runs.Run(s.out_dir, s.device, world, new=new, keep_latest=s.keep_latest) as run:
        device, rank = run.device, run.rank
        dtype = runs.autocast_dtype(s.dtype, device)
        train_data, val_data = open_data(s, cfg, rank)
        repeats = epochs_warning(s, train_data)
        if repeats:
            run.log(f"warning: {repeats}")
        torch.manual_seed(s.seed)
        runs.keep_freed_memory()
        raw = emo.Transformer(cfg).to(device)
        # what the run trains on, kept in every checkpoint (a resume checked its own against the corpus)
        step, data = 0, resume.state["data"] if resume else fingerprint(s.data)
        run_id = uuid.uuid4().hex if new else resume.state["run"]  # a branch is a run of its own
        evals = resume.state["evals"] if resume else []  # (step, E, val loss) of every eval: what a re-plan refits
        if resume and not resume.state.get("shards"):  # the weights before any sharding, the moments after
            runs.load_weights(raw, resume.state["model"], resume.path)
        model = wrap(raw, s, device)
        optimizer = make_optimizer(raw, s, device)
        if resume:
            step = runs.resume_from(resume, raw, optimizer, run)
        run.log(json.dumps({"settings": asdict(s), "model": asdict(cfg)}))
        run.log("stages: " + ", ".join(f"E={st.experts} steps {st.start}-{st.end}" for st in stages)
                + f" ({total_steps} steps of {batch_tokens} tokens, {accum} micro-batches each)")
        run.start({"run": run_id, "settings": asdict(s), "model": asdict(cfg), "stages": [asdict(st) for st in stages]},
                  resumed_from=resume and resume.path, step=step, source_run=resume and resume.state["run"])
        meter = report.Meter(run, s, stages, step, batch_tokens)

        def batch(i):  # this step's i-th micro-batch: this rank's share, in the seed's order
            return train_data.batch(step * accum + i, s.batch_size, cfg.seq_len, s.seed, rank, world)

        def evaluate_now(model, batches=None):
            return evaluate(model, val_data, s, raw.config, device, dtype, rank, world, batches)

        for stage in stages:
            if step >= stage.end:  # a resumed run: this stage is done
                continue
            meter.start_stage(stage, device)
            if raw.config.n_experts != stage.experts:  # the stage's first step
                model, raw, optimizer = grow(raw, optimizer, stage, s, run, evaluate_now, batch(0)[0])
            while step < stage.end:
                lr = lr_at(step, s, total_steps, stage)
                micro_batches = [tuple(t.to(device) for t in batch(i)) for i in range(accum)]
                try:
                    loss, ce, grad_norm, loads = meter.timed(
                        lambda: train_step(model, optimizer, micro_batches, lr, s.grad_clip, dtype))
                except NonFiniteLoss as err:
                    raise report.non_finite_advice(err, s, step, stage) from None
                except Exception as err:
                    if not run.preemption.requested:
                        raise
                    run.log_broken_step(step, err)  # a signal killed compile's workers mid-step: a stop
                    return raw, False
                step += 1
                meter.log_step(stage, step, loss, ce, lr, grad_norm, loads, raw.config, device)
                stage_end = step == stage.end
                full = step % s.eval_interval == 0 or stage_end
                if full or loop_eval(s, stages, stage, step):
                    batches = None if full else min(LOOP_EVAL_BATCHES, s.eval_batches)
                    val = meter.log_eval(evaluate_now(model, batches), stage, step, batches)
                    evals.append(dict(step=step, experts=stage.experts, val_loss=float(val["loss"])))
                    if stage_end:
                        meter.end_stage(stage, step, val, raw, optimizer, device)
                        if loop_on(s) and stage.index < len(stages) - 1:
                            stages[stage.index:] = replan(s, stages, stage.index, run, raw.config, batch_tokens,
                                                          evals, law)
                stop = bool(s.stop_at and step >= s.stop_at)
                preempted = run.stop_requested()
                periodic = s.checkpoint_interval and step % s.checkpoint_interval == 0
                if periodic or stage_end or stop or preempted or step == total_steps:
                    run.checkpoint(step, stage.index if stage_end else None, dict(
                        raw=raw, optimizer=optimizer, settings=s, world_size=world, run=run_id, data=data,
                        ends=[st.end for st in stages], law=law, evals=evals))
                if stop or preempted:
                    run.log(f"stopped at step {step} ({'signal' if preempted else '--stop_at'}); resume with: "
                            f"python train.py --resume={shlex.quote(s.out_dir)}")
                    return raw, False
        if s.sample_tokens:
            run.log("sample: " + repr(sample(raw, train_data.encoding(), s.sample_tokens, device, dtype)))
        if run.master:  # record() flushed every line: the plot reads them all
            run.log(report.plot_losses({Path(s.out_dir).name: Path(s.out_dir)}, Path(s.out_dir) / "loss.png"))
        if dist.is_initialized():  # wait for rank 0's sample and plot: a rank that tears down gloo early can abort
            dist.barrier()
    return raw, True


def grow(raw, optimizer, stage, s, run, evaluate_now, x):
    """At the stage's first step: grow every layer's experts (emo.grow_experts), fit the optimizer to them,
    re-wrap (compile and DDP see new shapes; under FSDP2, grow_sharded). Records the val loss right after, and
    per rank the sum of the weights it computed (all drew the same new experts) and of its first micro-batch x
    (each reads its own data). Returns (the model, the unwrapped model, the optimizer): under FSDP2 new ones."""
    t0, old, step = time.time(), raw.config.n_experts, stage.start
    if isinstance(raw, FSDPModule):
        raw, optimizer, weights = grow_sharded(raw, optimizer, stage.experts, s, run.device)
        model = raw
    else:
        emo.grow_experts(raw, stage.experts, init=s.growth_init)
        emo.grow_optimizer(optimizer, s.growth_optimizer)
        weights = sum(p.detach().double().sum().item() for p in raw.parameters())
        model = wrap(raw, s, run.device)
    seconds = time.time() - t0
    val = evaluate_now(model)
    run.log(f"step {step}: grew E {old} -> {stage.experts} ({s.growth_init} init, optimizer {s.growth_optimizer}) "
            f"in {seconds:.2f}s; val loss right after: {val['loss']:.4f}")
    run.record("growth", step=step, stage=stage.index, experts_from=old, experts=stage.experts, init=s.growth_init,
               seconds=seconds, val_loss=val["loss"], val_bpb=val["bpb"], weights_per_rank=runs.per_rank(weights),
               tokens_per_rank=runs.per_rank(int(x.sum())))
    return model, raw, optimizer


def grow_sharded(raw, optimizer, n_experts, s, device):
    """Growth under FSDP2, one MoE layer at a time. The grown model is made as shapes only (meta), sharded,
    then filled shard by shard: tensors that keep their shape copy their local shards; each MoE layer is
    gathered whole, grown by emo.grow_layer exactly as unsharded growth grows it (the same random draws in
    the same order), and each rank keeps its shard of the result. The optimizer follows as emo.grow_optimizer
    has it (reset: no state; keep: old rows keep their moments, new rows start at zero). Peak memory is the
    sharded state plus one layer's whole experts, never the whole model (at EMO-modular's shape, 224 GB of
    weights and moments). Returns (the grown model, its optimizer, the sum of the grown layers' weights as
    this rank computed them)."""
    cfg = raw.config  # the schedule and --growth_init were checked before the run began
    with torch.random.fork_rng(devices=[]), torch.device("meta"):  # shapes only, no draws
        grown = emo.Transformer(replace(cfg, n_experts=n_experts))
    wrap(grown, s, device)
    grown.to_empty(device=device)
    new_optimizer = make_optimizer(grown, s, device)
    moments = ({name: optimizer.state[p] for name, p in raw.named_parameters() if p in optimizer.state}
               if s.growth_optimizer == "keep" else {})
    old_params, old_buffers = dict(raw.named_parameters()), dict(raw.named_buffers())
    weights = 0.0
    for i, (moe, new_moe) in enumerate(zip(raw.moe_layers(), grown.moe_layers())):
        layer = whole_layer(moe, cfg, device)
        emo.grow_layer(layer, n_experts - cfg.n_experts, s.growth_init)
        weights += sum(p.detach().double().sum().item() for p in layer.parameters())
        targets = dict(new_moe.named_parameters())
        for name, whole in layer.named_parameters():
            put_shard(targets[name], whole)
            if f"blocks.{i}.moe.{name}" in moments:  # old experts' rows keep their moments, new rows start at 0
                new_optimizer.state[targets[name]] = {
                    key: put_shard(torch.zeros_like(targets[name]), emo.zero_padded(v.full_tensor(), whole.shape))
                    if v.dim() else v.clone()
                    for key, v in moments[f"blocks.{i}.moe.{name}"].items()}
        for name, b in new_moe.named_buffers():  # not sharded: whole on every rank
            b.copy_(dict(layer.named_buffers())[name])
        new_moe.expert_mask = layer.expert_mask
    in_moe = tuple(f"blocks.{i}.moe." for i in range(cfg.n_layer))
    with torch.no_grad():  # the rest keeps its shape, so each rank keeps its own shards
        for name, p in grown.named_parameters():
            if not name.startswith(in_moe):
                p.to_local().copy_(old_params[name].to_local())
                if name in moments:
                    new_optimizer.state[p] = {key: v.clone() for key, v in moments[name].items()}
        for name, b in grown.named_buffers():
            if not name.startswith(in_moe):
                b.copy_(old_buffers[name])
    return grown, new_optimizer, weights


def whole_layer(moe, cfg, device):
    """An unsharded copy of a sharded MoE layer: every rank gathers its parameters (all ranks take part)."""
    with torch.random.fork_rng(devices=[]), torch.device("meta"):
        layer = emo.MoE(cfg)
    layer.to_empty(device=device)
    with torch.no_grad():
        for (_, p), (_, q) in zip(layer.named_parameters(), moe.named_parameters()):
            p.copy_(q.full_tensor() if isinstance(q, DTensor) else q)
        for (_, b), (_, c) in zip(layer.named_buffers(), moe.named_buffers()):
            b.copy_(c)
    layer.expert_mask = moe.expert_mask
    return layer


@torch.no_grad()
def put_shard(target, whole):
    """Copy this rank's shard of `whole` into the sharded tensor target (a DTensor); returns target."""
    target.to_local().copy_(distribute_tensor(whole, target.device_mesh, target.placements,
                                              src_data_rank=None).to_local())
    return target


LOOP_EVALS = 6  # evals the closed loop takes in each stage it re-plans after: enough for the stage's own curve
LOOP_EVAL_BATCHES = 8  # each on the first 8 of the eval batches: ~1/4 of an eval's cost, noisier (the fit knows)


def loop_on(s):
    """Does the closed loop re-plan this run? Only a split the law made as it stands: --stages and --grow_after
    splits are the user's (or a measurement's), kept as given."""
    return s.replan and not s.stages and not s.grow_after


def loop_eval(s, stages, stage, step):
    """An extra eval for the closed loop: LOOP_EVALS evenly spaced ones in each stage whose end it re-plans after
    (all but the last two: the last one's end is the run's), so each pool size has its own curve (eval_interval
    alone can leave a short stage one eval)."""
    every = max(1, (stage.end - stage.start) // LOOP_EVALS)
    return loop_on(s) and stage.index < len(stages) - 1 and (step - stage.start) % every == 0


def replan(s, stages, done, run, cfg, batch_tokens, evals, law):
    """--replan, at the end of stage `done`: the law refit to this run's evals so far moves the later stage ends
    (emo.replan_run, on rank 0 for all); the new ends travel in every later checkpoint, and a "replan" record
    in metrics.jsonl says why."""
    settle = (s.warmup_steps, max(s.rewarm_steps, cfg.phase_in_steps if s.growth_init in emo.PHASED_INITS else 0))
    found = emo.replan_run(evals, law, s.replan_params, stages, done, cfg, batch_tokens, settle) if run.master else None
    ends, record = runs.from_rank0(found)
    run.record("replan", step=stages[done - 1].end, **record)
    why = record["unchanged_because"]
    run.log(f"re-planned at the end of stage {done}: ends {record['ends_before']} -> {ends} {why or ''}")
    return emo.stages_at([st.experts for st in stages], ends)[done:]


def sample(raw, enc, n_tokens, device, dtype):
    """n_tokens sampled after an indented "def" (temperature 0.8, top-50), decoded with the corpus's tokenizer.
    No trailing space in the prompt: GPT-2's tokens carry their leading space, so a lone " " token is rare in
    training text and a prompt ending in one draws more spaces."""
    prompt = torch.tensor([enc.encode_ordinary("    def")], device=device)
    raw.eval()
    with runs.autocast(device, dtype):
        out = raw.generate(prompt, n_tokens, temperature=0.8, top_k=50)
    raw.train()
    return enc.decode([t for t in out[0].tolist() if t < enc.n_vocab])


# --- From flags to a run ------------------------------------------------------------------------------------


def setup(argv):
    """Flags -> (Settings, Config, stages, world size, resume, law) with every check that needs no data or
    device. resume: None, or a runs.Resume; law: the ScalingLaw the schedule plans with."""
    s, model_settings, given = parse(argv)
    world = int(os.environ.get("WORLD_SIZE", "1"))
    resume = None
    if s.resume:
        state, path = runs.load_checkpoint(s.resume, settings_type=Settings)
        s, model_settings = runs.resumed_settings(state, s, model_settings, given, RESUMABLE, PER_INVOCATION,
                                                   OLDER)
        out_dir, branching = runs.check_resume(state, path, s.data, "out_dir" in given and s.out_dir, world)
        s.out_dir = str(out_dir)
        resume = runs.Resume(state, path, branching)
    experts, fractions = parse_stages(s)
    # the law the schedule plans with, as values: a resume keeps its checkpoint's, whatever its --law file says now
    law = emo.ScalingLaw(**resume.state["law"]) if resume else flags.read_law(s.law) if s.law else emo.ScalingLaw()
    if not resume:  # a new run starts at the first stage's E, sized for its corpus's tokenizer
        size_for_corpus(model_settings, s.data)
        first = experts[0]
        top_k = model_settings.get("top_k", emo.Config.top_k)
        if isinstance(top_k, int) and top_k > first:
            raise SettingError(f"--top_k={top_k} is not allowed: must be at most the first stage's E={first} "
                               f"(--{'stages' if s.stages else 'experts'})")
        model_settings["n_experts"] = first
    try:
        cfg = emo.Config(**model_settings)  # validates the model settings
        for E in experts:  # and every later stage's model too, so nothing is refused at a growth, mid-run
            emo.Config(**{**model_settings, "n_experts": E})
    except SettingError as err:
        raise SettingError(f"--resume={resume.path}: its model config: {err}") if resume else err from None
    validate(s, cfg, world, len(experts))
    check_memory(emo.Config(**{**model_settings, "n_experts": experts[-1]}), s, world)
    stages = plan_schedule(s, cfg, batch_tokens_of(s, cfg, world)[1], experts, fractions, law)
    if resume:  # the stage ends as the run last moved them (the closed loop), from its checkpoint
        ends = resume.state["ends"]
        require(len(ends) == len(experts) and ends[-1] == stages[-1].end, f"--resume={resume.path}: its stage ends",
                ends, f"{len(experts)} ends, the last at step {stages[-1].end} (corrupt or edited)")
        stages = emo.stages_at(experts, ends)
        runs.check_resume_step(resume.state["step"], resume.path, cfg.n_experts, stages, s.stop_at)
    return s, cfg, stages, world, resume, law


def run(argv):
    """Train as the flags say; returns (the model, whether the run finished)."""
    s, cfg, stages, world, resume, law = setup(argv)
    return train(s, cfg, stages, world, resume, law)


def main(argv=None):
    try:
        _, finished = run(sys.argv[1:] if argv is None else argv)
    except (SettingError, DataError, TrainingError) as err:
        sys.exit(f"train.py: {err}")
    except KeyboardInterrupt:  # Ctrl-C before the run's own handler was set: nothing to save yet
        sys.exit("train.py: interrupted")
    if not finished:
        sys.exit(EXIT_STOPPED)


if __name__ == "__main__":
    main()

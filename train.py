"""Train an MoE whose expert pool grows in stages (EMO-progressive), on CPU, one GPU, or many via torchrun.

python train.py                                    # the default: E = 2 -> 4 -> ... -> 32, ~5 minutes on 2 CPU cores
python train.py --config=configs/gpu-8x.json       # settings from a JSON file; flags override it
torchrun --standalone --nproc_per_node=8 train.py --config=configs/gpu-8x.json
python train.py --resume=runs/default              # continue exactly where a run stopped
python train.py --schedule=fixed --experts=8       # the fixed-E baseline

Every Settings and emo.Config field is a --key=value flag; paths are relative to the working directory.
The run folder (--out_dir) gets config.json, metrics.jsonl (one record per step, eval, growth and stage
end), latest.pt and one checkpoint per stage; one run at a time owns it. Exit status: 0 the run finished,
75 it stopped early and can be resumed (a signal or --stop_at), 1 an error (printed as one line).
"""

import errno
import fcntl
import json
import math
import os
import re
import shutil
import signal
import sys
import time
import uuid
from contextlib import nullcontext
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP

import emo
from data.corpus import DEFAULT_FOLDER, Corpus, DataError, fingerprint, fingerprint_change, prepare, vocabulary
from emo import SettingError, require

HERE = Path(__file__).resolve().parent
CHECKPOINT_FORMAT = "emo-checkpoint-3"
EXIT_STOPPED = 75  # EX_TEMPFAIL: stopped before the end on purpose; `--resume` continues it


@dataclass
class Settings:
    data: str = "data/default"  # a corpus folder made by data/prepare.py
    out_dir: str = "runs/default"
    resume: str = ""  # a checkpoint, or a run folder (its latest.pt)
    config: str = ""  # a JSON file of settings; flags override it
    # the schedule
    total_tokens: int = 4_000_000
    schedule: str = "progressive"  # "progressive" (stage budgets from the scaling law) or "fixed"
    experts: str = "2,4,8,16,32"  # E per stage; the fixed schedule uses the last
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
    grad_clip: float = 1.0  # 0: no clipping
    # running
    device: str = "auto"  # auto, cpu, cuda, cuda:N
    dtype: str = "auto"  # autocast: bf16 or fp32 (auto: bf16 on CUDA, fp32 on CPU)
    compile: bool = False
    seed: int = 0
    eval_interval: int = 100  # steps between validation evals (and at every stage end)
    eval_batches: int = 32  # 65K tokens at the default batch: enough to tell runs apart (RESULTS.md)
    log_interval: int = 10
    sample_tokens: int = 48  # length of the text sample printed at the end (0: none)
    stop_at: int = 0  # save and exit after this many steps (a time-limited job); resume later
    checkpoint_interval: int = 100  # steps between latest.pt saves (also at every stage end and the end)
    keep_latest: int = 1  # checkpoints kept besides stage ends: with N > 1 the N newest as stepS.pt too
    collapse_steps: int = 200  # warn when an expert of a layer got no token for this many steps
    max_load_cv: float = 2.0  # warn when a layer's expert-load coefficient of variation exceeds this


SCHEDULES, LR_SCHEDULES, DTYPES = ("progressive", "fixed"), ("wsd", "cosine"), ("auto", "bf16", "fp32")
# settings a resumed run may change; anything else must match the checkpoint. lr and grad_clip may change
# so that a run that diverged can go on from its last checkpoint more gently.
RESUMABLE = {"resume", "config", "device", "dtype", "compile", "eval_interval", "eval_batches", "log_interval",
             "sample_tokens", "stop_at", "checkpoint_interval", "keep_latest", "out_dir", "collapse_steps",
             "max_load_cv", "lr", "grad_clip"}
PER_INVOCATION = {"resume", "config", "stop_at"}  # orders for this command only, never inherited on resume


class TrainingError(RuntimeError):
    """The run cannot go on (a non-finite loss): printed as one line naming the step and what to do."""


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
        if _ and not value:  # an unset shell variable, say: never silently the default
            raise SettingError(f"--{key}= is empty: give a value, or leave the flag out for its default")
        values[key] = value if _ else "true"
    if "config" in values:
        from_file = read_config_file(values["config"])
        for flag, other in (("stages", "experts"), ("experts", "stages")):  # flags override the file
            if flag in values:
                from_file.pop(other, None)
        values = {**from_file, **values}
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
    for key, value in data.items():
        if key in ("config", "resume"):
            raise SettingError(f"--config={path}: {key!r} is not a setting a config file can give (a flag only)")
        if value == "" or value == []:
            raise SettingError(f"--config={path}: {key!r} is empty: give a value, or leave it out for its default")
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
    except (ValueError, OverflowError):  # OverflowError: int("inf")
        raise SettingError(f"--{key}={value}: expected {'true/false' if kind is bool else kind.__name__}") from None


def validate(s, cfg, world, n_stages):
    """Everything that can be checked before touching data or a device: one line naming the setting."""
    def choice(key, allowed):
        require(getattr(s, key) in allowed, f"--{key}", getattr(s, key), f"one of {', '.join(allowed)}")

    choice("schedule", SCHEDULES)
    choice("lr_schedule", LR_SCHEDULES)
    choice("growth_init", emo.GROWTH_INITS)
    choice("growth_optimizer", emo.OPTIMIZER_MODES)
    choice("dtype", DTYPES)
    for key in ("total_tokens", "batch_size", "eval_interval", "eval_batches", "log_interval", "collapse_steps",
                "keep_latest"):
        require(getattr(s, key) >= 1, f"--{key}", getattr(s, key), "a positive integer")
    for key in ("batch_tokens", "warmup_steps", "rewarm_steps", "sample_tokens", "stop_at", "checkpoint_interval"):
        require(getattr(s, key) >= 0, f"--{key}", getattr(s, key), "an integer >= 0")
    require(0 <= s.seed < 2**32, "--seed", s.seed, "an integer in [0, 2**32)")
    for key in ("lr", "max_load_cv"):
        require(math.isfinite(getattr(s, key)) and getattr(s, key) > 0, f"--{key}", getattr(s, key), "a finite number > 0")
    for key in ("weight_decay", "grad_clip"):
        require(math.isfinite(getattr(s, key)) and getattr(s, key) >= 0, f"--{key}", getattr(s, key),
                "a finite number >= 0")
    for key in ("min_lr_frac", "decay_frac"):  # NaN fails every comparison
        require(0 <= getattr(s, key) <= 1, f"--{key}", getattr(s, key), "in [0, 1]")
    for key in ("beta1", "beta2"):
        require(0 <= getattr(s, key) < 1, f"--{key}", getattr(s, key), "in [0, 1)")
    require(s.out_dir != "", "--out_dir", s.out_dir, "a folder path (it is empty)")
    micro_tokens = s.batch_size * cfg.seq_len * world
    require(s.batch_tokens % micro_tokens == 0, "--batch_tokens", s.batch_tokens,
            f"a multiple of batch_size * seq_len * processes = {s.batch_size}*{cfg.seq_len}*{world} = {micro_tokens}")
    step_tokens = s.batch_tokens or micro_tokens
    require(s.total_tokens >= step_tokens * n_stages, "--total_tokens", s.total_tokens,
            f"at least one optimizer step per stage: {n_stages} x {step_tokens} tokens (" +
            ("--batch_tokens" if s.batch_tokens else f"--batch_size * --seq_len * processes = {s.batch_size} * "
             f"{cfg.seq_len} * {world}") + "); or make the batch smaller")
    require(not (s.growth_init == "silent" and cfg.router == "softmax" and n_stages > 1), "--growth_init",
            s.growth_init, "gaussian or copy with --router=softmax (softmax gates are normalised over all experts, "
            "so no growth can leave the output unchanged)")
    resolve_device(s.device)


def resolve_device(setting):
    """'auto' -> cuda if this machine has one, else cpu; a device the machine lacks is refused."""
    if setting == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    require(re.fullmatch(r"cpu|cuda(:\d+)?", setting), "--device", setting, "auto, cpu, cuda or cuda:N")
    if setting.startswith("cuda"):
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        require(count > 0, "--device", setting, "cpu or auto: this machine has no CUDA device")
        require(int(setting.partition(":")[2] or 0) < count, "--device", setting, f"cuda:0..cuda:{count - 1}")
    return setting


def parse_stages(s):
    """--stages (E:fraction,...) or --experts (E,...) -> (the E of each stage, fractions or None)."""
    key, text = ("stages", s.stages) if s.stages else ("experts", s.experts)
    try:
        parts = [part.split(":") for part in text.split(",")]
        experts = [int(part[0]) for part in parts]
        fractions = [float(part[1]) if len(part) == 2 else math.nan for part in parts] if s.stages else None
    except ValueError:
        raise SettingError(f"--{key}={text}: expected comma-separated {'E:fraction' if s.stages else 'integers'}") from None
    if s.stages and s.schedule == "fixed":
        raise SettingError("--stages gives a progressive schedule: --schedule=fixed takes --experts=E instead")
    if any(E < 1 for E in experts) or any(b <= a for a, b in zip(experts, experts[1:])):
        raise SettingError(f"--{key}={text}: expert counts must be positive and strictly increasing")
    if s.schedule == "fixed":
        experts = experts[-1:]
    if fractions and (any(not f > 0 for f in fractions) or abs(sum(fractions) - 1) > 1e-6):
        raise SettingError(f"--stages={s.stages}: each stage needs E:fraction, fractions > 0 summing to 1")
    return experts, fractions


@dataclass(frozen=True)
class Stage:
    index: int  # 1, 2, ...
    experts: int  # E during the stage
    start: int  # first optimizer step
    end: int  # the step after its last


def plan_schedule(s, cfg, batch_tokens, experts, fractions):
    """The run's stages in optimizer steps: explicit --stages fractions, one fixed stage, or the scaling-law
    solver (emo.plan_stages) for this model's active size."""
    total_steps = s.total_tokens // batch_tokens
    if fractions:
        ends = [round(total_steps * sum(fractions[:i + 1])) for i in range(len(fractions))]
    else:
        n_active = emo.law_active_params(emo.Config(**{**asdict(cfg), "n_experts": experts[-1]}))
        plan = emo.plan_stages(n_active, total_steps * batch_tokens, experts, cfg.top_k, batch_tokens=batch_tokens)
        ends = [p["end"] // batch_tokens for p in plan]
    starts = [0] + ends[:-1]
    if any(e <= b for b, e in zip(starts, ends)):
        raise SettingError(f"the schedule gives a stage no steps (ends at steps {ends}); give more --total_tokens")
    return [Stage(i + 1, E, b, e) for i, (E, b, e) in enumerate(zip(experts, starts, ends))]


# ---------------------------------------------------------------------------------------------
# Learning rate: warmup-stable-decay (or cosine), re-warmed after each growth
# ---------------------------------------------------------------------------------------------


def lr_at(step, s, total_steps, stage):
    """Base schedule times a linear (re-)warmup from the stage's first step (the paper re-warms at growth)."""
    warm_steps = s.warmup_steps if stage.index == 1 else s.rewarm_steps
    warm = min(1.0, (step - stage.start + 1) / warm_steps) if warm_steps else 1.0
    low = s.lr * s.min_lr_frac
    if s.lr_schedule == "wsd":
        decay_start = total_steps * (1 - s.decay_frac)
        frac = max(0.0, (step - decay_start) / max(total_steps - decay_start, 1))
        return warm * (s.lr - (s.lr - low) * frac)
    progress = step / max(total_steps - 1, 1)
    return warm * (low + 0.5 * (s.lr - low) * (1 + math.cos(math.pi * progress)))


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


# ---------------------------------------------------------------------------------------------
# The run folder: one owner, atomic files, checkpoints that cannot run code
# ---------------------------------------------------------------------------------------------

RUN_FILE = re.compile(r"config\.json|metrics\.jsonl|loss\.png|(latest|stage\d+|step\d+)\.pt")  # what a run writes
TEMP_NAME = re.compile(r"(latest|stage\d+|step\d+)\.pt\.tmp\.\d+|(config\.json|metrics\.jsonl)\.tmp\.\d+")


def claim_folder(out_dir, resuming):
    """Make out_dir this run's own: create it, refuse a file or a read-only folder, refuse a new run into a
    folder that holds one, and lock it against a second process (the lock dies with the process, kill -9
    included). Returns the open lock file, to keep for the run's lifetime."""
    if out_dir.exists() and not out_dir.is_dir():
        raise SettingError(f"--out_dir={out_dir} is a file: give a folder")
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise SettingError(f"--out_dir={out_dir}: cannot create it ({err.strerror})") from None
    if not os.access(out_dir, os.W_OK | os.X_OK):
        raise SettingError(f"--out_dir={out_dir} is not writable")
    lock = open(out_dir / ".lock", "a+")
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        lock.seek(0)
        owner = lock.read().strip() or "?"
        lock.close()
        raise SettingError(f"--out_dir={out_dir}: another training process (pid {owner}) is running there; wait "
                           f"for it or give another --out_dir") from None
    try:  # unbuffered, so that closing the file later never has a write left to fail
        os.ftruncate(lock.fileno(), 0)
        os.write(lock.fileno(), str(os.getpid()).encode())
    except OSError as err:
        lock.close()
        raise SettingError(f"--out_dir={out_dir}: cannot write there: {why_not_written(err, out_dir / '.lock')}") from None
    ours = sorted(p for p in out_dir.iterdir() if RUN_FILE.fullmatch(p.name) or TEMP_NAME.fullmatch(p.name))
    if not resuming and ours and not never_checkpointed(out_dir, ours):
        lock.close()
        if (out_dir / "latest.pt").exists() or run_id(out_dir):
            raise SettingError(f"--out_dir={out_dir} already holds a run: continue it with --resume={out_dir}, or "
                               f"start over in another --out_dir (or delete this folder first)")
        raise SettingError(f"--out_dir={out_dir} holds {ours[0].name}, which a run writes: give another --out_dir "
                           f"(or move your file)")
    for path in ours:  # a new run: what a run that never checkpointed left; a resume: stale temp files
        if not resuming or TEMP_NAME.fullmatch(path.name):
            path.unlink()
    return lock


def never_checkpointed(out_dir, files):
    """Did these files come from a train.py run that stopped before its first checkpoint (a non-finite loss,
    a kill while compiling)? Then there is nothing to resume, and a new run may start over in the folder."""
    left = {p.name for p in files if not TEMP_NAME.fullmatch(p.name)}
    return "config.json" in left and left <= {"config.json", "metrics.jsonl"} and run_id(out_dir) is not None


def folder_owner(out_dir):
    """The pid of the training process that holds out_dir's lock (claim_folder), or None if none does."""
    path = Path(out_dir) / ".lock"
    if not path.exists():
        return None
    with open(path, "a+") as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            lock.seek(0)
            return lock.read().strip() or "?"
        fcntl.flock(lock, fcntl.LOCK_UN)
    return None


def open_for_append(path):
    try:
        return open(path, "a")
    except OSError as err:
        raise TrainingError(f"cannot write {path}: {why_not_written(err, path)}") from None


def fsync_folder(folder):
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write(path, write):
    """Write path so that a crash leaves the old file or the new one, never a torn one: a temp file named
    by this process (two processes never collide), fsync, rename, fsync the folder. A full disk or a file
    that cannot be written is one line naming the path (the old file stays as it was)."""
    tmp = path.with_name(f"{path.name}.tmp.{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as err:
        raise TrainingError(f"cannot write {path}: {why_not_written(err, path)}; it stays as it was") from None
    except RuntimeError as err:  # torch.save's writer reports a short write (a full disk) as "unexpected pos"
        if "unexpected pos" not in str(err) and "PytorchStreamWriter" not in str(err):
            raise
        raise TrainingError(f"cannot write {path}: the write fell short, most likely no space left on the device "
                            f"holding {path.parent}; it stays as it was") from None
    finally:
        tmp.unlink(missing_ok=True)
    fsync_folder(path.parent)


def why_not_written(err, path):
    """An OSError on writing path, in the words a user acts on."""
    if err.errno == errno.ENOSPC:
        return f"no space left on the device holding {path.parent}"
    if err.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        return "not writable (permissions, or a read-only file system)"
    return err.strerror or type(err).__name__


def link_atomically(src, dst):
    """dst becomes a hard link of src (the same checkpoint, no second write), replacing an old dst in one
    rename, so a kill at any moment leaves the old dst or the new one."""
    tmp = dst.with_name(f"{dst.name}.tmp.{os.getpid()}")
    tmp.unlink(missing_ok=True)
    os.link(src, tmp)
    os.replace(tmp, dst)


def rng_states(device):
    """Every rank's random state, gathered (call it on all ranks): entry r is rank r's CPU generator and, on
    CUDA, its own device's generator. Ranks draw different numbers on the GPU (document pools of their own
    data), so each resumes from its own state, and a machine with fewer GPUs visible resumes just the same."""
    mine = {"cpu": torch.get_rng_state(), "cuda": torch.cuda.get_rng_state(device) if device.type == "cuda" else None}
    if not dist.is_initialized():
        return [mine]
    everyone = [None] * dist.get_world_size()
    dist.all_gather_object(everyone, mine)
    return everyone


def restore_rng(rng, rank, device):
    """This rank's entry of rng_states: its CPU generator, and its own CUDA device's where it trained on one."""
    torch.set_rng_state(rng[rank]["cpu"])
    if device.type == "cuda" and rng[rank]["cuda"] is not None:
        torch.cuda.set_rng_state(rng[rank]["cuda"], device)


def save_checkpoint(path, raw, optimizer, s, step, world, retained, rng, run, data):
    """Everything a resume needs, as tensors, numbers, strings, lists and dicts (loadable with weights_only);
    run: the run's id (config.json has it too), data: the corpus's fingerprint, both checked on resume."""
    state = {"format": CHECKPOINT_FORMAT, "model": raw.state_dict(), "optimizer": optimizer.state_dict(),
             "config": asdict(raw.config), "settings": asdict(s), "step": step, "world_size": world,
             "retained": list(retained), "rng": rng, "run": run, "data": data}
    atomic_write(path, lambda f: torch.save(state, f))


CHECKPOINT_KEYS = ("model", "optimizer", "config", "settings", "step", "world_size", "retained", "rng", "run", "data")


def load_checkpoint(path, flag="--resume"):
    """A checkpoint file, or a run folder's latest.pt, loaded with weights_only=True: a crafted file can only
    fail to load, never run code. Returns (state, the file's path)."""
    path = Path(path)
    if path.is_dir():
        path = path / "latest.pt"
    if not path.is_file():
        if path.name == "latest.pt" and run_id(path.parent):
            raise SettingError(f"{flag}={path.parent}: the run there stopped before its first checkpoint, so there "
                               f"is nothing to resume: run the same command without {flag} to start it over")
        raise SettingError(f"{flag}={path}: no such checkpoint")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # any unpickling failure: a corrupt, truncated or foreign (maybe hostile) file
        raise SettingError(f"{flag}={path}: not a loadable emo checkpoint ({type(err).__name__}); corrupt, "
                           f"truncated, or not made by train.py") from None
    if not isinstance(state, dict) or state.get("format") != CHECKPOINT_FORMAT:
        found = state.get("format") if isinstance(state, dict) else type(state).__name__
        raise SettingError(f"{flag}={path}: not an {CHECKPOINT_FORMAT} checkpoint (found {found!r})")
    missing = [key for key in CHECKPOINT_KEYS if key not in state]
    if missing:
        raise SettingError(f"{flag}={path}: the checkpoint lacks {', '.join(missing)} (corrupt)")
    wrong = next((key for key, ok in checkpoint_field_checks(state) if not ok()), None)
    if wrong:
        raise SettingError(f"{flag}={path}: the checkpoint's {wrong!r} is not what train.py writes (corrupt or "
                           f"edited): {str(state[wrong])[:60]}")
    broken = next((name for name, t in state["model"].items() if t.is_floating_point() and not t.isfinite().all()), None)
    if broken:
        raise SettingError(f"{flag}={path}: its weight {broken} holds NaN or inf (a damaged file, or saved from a run "
                           f"that diverged): go on from an earlier checkpoint of the run (stageN.pt, stepN.pt)")
    unknown = set(state["config"]) - set(emo.Config.__dataclass_fields__)
    if unknown:
        raise SettingError(f"{flag}={path}: its model config has fields this emo.py does not know: "
                           f"{', '.join(sorted(unknown))} (made by another version?)")
    return state, path


def checkpoint_field_checks(state):
    """(field, check) pairs in the order a loader relies on them: each check is a no-argument callable."""
    def is_int(v, low):
        return isinstance(v, int) and not isinstance(v, bool) and v >= low

    def is_state(v):
        return torch.is_tensor(v) and v.dtype == torch.uint8

    return [("model", lambda: isinstance(state["model"], dict) and all(map(torch.is_tensor, state["model"].values()))),
            ("optimizer", lambda: isinstance(state["optimizer"], dict)),
            ("config", lambda: isinstance(state["config"], dict)),
            ("settings", lambda: isinstance(state["settings"], dict) and all(
                type(state["settings"][f.name]) is type(getattr(Settings(), f.name))
                for f in fields(Settings) if f.name in state["settings"])),
            ("step", lambda: is_int(state["step"], 0)),
            ("world_size", lambda: is_int(state["world_size"], 1)),
            ("retained", lambda: isinstance(state["retained"], list) and all(is_int(v, 1) for v in state["retained"])),
            ("rng", lambda: isinstance(state["rng"], list) and len(state["rng"]) >= 1 and all(
                isinstance(r, dict) and is_state(r.get("cpu")) and (r.get("cuda") is None or is_state(r["cuda"]))
                for r in state["rng"])),
            ("run", lambda: isinstance(state["run"], str)),
            ("data", lambda: isinstance(state["data"], dict) and isinstance(state["data"].get("domains"), list)
                and isinstance(state["data"].get("tokens"), dict) and isinstance(state["data"].get("sha256"), str))]


def model_from_checkpoint(state, path, **overrides):
    """Rebuild the checkpoint's Transformer (from load_checkpoint); weights that do not fit give one line."""
    try:
        cfg = emo.Config(**{**state["config"], **overrides})
    except SettingError as err:
        raise SettingError(f"{path}: its model config: {err}") from None
    raw = emo.Transformer(cfg)
    load_weights(raw, state["model"], path)
    return raw


def load_weights(raw, state_dict, path):
    """load_state_dict, after checking names and shapes so a mismatch is one line, not a page of them."""
    state_dict = strip_prefixes(state_dict)
    expected = raw.state_dict()
    wrong = sorted(expected.keys() ^ state_dict.keys()) or \
        [k for k in expected if tuple(expected[k].shape) != tuple(state_dict[k].shape)]
    if wrong:
        k = wrong[0]
        detail = (f"{k} has shape {list(state_dict[k].shape)}, the config needs {list(expected[k].shape)}"
                  if k in expected and k in state_dict else f"{k} is {'missing' if k in expected else 'unexpected'}")
        raise SettingError(f"{path}: its weights do not match its config ({detail}; {len(wrong)} such): corrupt")
    raw.load_state_dict(state_dict)


def strip_prefixes(state_dict):
    """Checkpoints load with or without DDP (module.) and torch.compile (_orig_mod.) prefixes."""
    out = {}
    for key, value in state_dict.items():
        for prefix in ("module.", "_orig_mod."):
            key = key.replace(prefix, "")
        out[key] = value
    return out


def resumed_settings(state, s, model, given):
    """The checkpoint's settings and model; flags may change only RESUMABLE settings, else one clear line."""
    try:
        old = Settings(**state["settings"])
    except TypeError:
        raise SettingError("--resume: the checkpoint's settings are not this train.py's (made by another "
                           "version?)") from None
    changed = [k for k in given if k in Settings.__dataclass_fields__ and k not in RESUMABLE
               and getattr(s, k) != getattr(old, k)]
    changed += [k for k in given if k in emo.Config.__dataclass_fields__ and model[k] != state["config"].get(k)]
    if changed:
        raise SettingError("--resume: these settings differ from the checkpoint's and cannot change mid-run: "
                           + ", ".join(f"{k} (checkpoint {state['config'].get(k, getattr(old, k, None))!r})"
                                       for k in changed))
    for k in (given & RESUMABLE) | PER_INVOCATION:
        setattr(old, k, getattr(s, k))
    return old, dict(state["config"])


def resume_destination(checkpoint, state, s, given):
    """Where a resumed run writes: the folder it was resumed from, continued in place, which needs that
    folder's newest checkpoint (an older one would overwrite later progress); or a new --out_dir, a branch
    that starts with the source's metrics up to the checkpoint. Returns (out_dir, branching)."""
    source = checkpoint.parent
    out_dir = Path(s.out_dir) if "out_dir" in given else source
    if out_dir.resolve() != source.resolve():
        return out_dir, True
    latest = source / "latest.pt"
    if not latest.exists() or not os.path.samefile(checkpoint, latest):
        raise SettingError(f"--resume={checkpoint} is not {source}'s latest checkpoint: continuing there would "
                           f"overwrite its later progress; give --out_dir=NEW_FOLDER to branch from it")
    if run_id(source) != state["run"]:
        raise SettingError(f"--resume={checkpoint} was not written by the run in {source} (its config.json names "
                           f"another run): continuing would mix two runs' histories; give --out_dir=NEW_FOLDER to "
                           f"branch from it")
    return out_dir, False


def run_id(folder):
    """The id in a run folder's config.json, or None where there is none (or it is not train.py's)."""
    try:
        return json.loads((Path(folder) / "config.json").read_text()).get("run")
    except (OSError, ValueError, AttributeError):
        return None


# ---------------------------------------------------------------------------------------------
# metrics.jsonl: one JSON record per line, appended and flushed as the run goes
# ---------------------------------------------------------------------------------------------


def read_metrics(folder):
    """A run folder's metrics.jsonl as a list of records (step, eval, growth, stage, warning). A torn last
    line (a process killed mid-write) is left out; damage anywhere else is an error."""
    path = Path(folder) / "metrics.jsonl"
    lines = [line for line in path.read_text().splitlines() if line.strip()]
    records = []
    for n, line in enumerate(lines, 1):
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            if n < len(lines):
                raise DataError(f"{path}:{n}: not a JSON record (the file is damaged)") from None
    return records


def logged_by(record, step):
    """Was this record written before the checkpoint at `step`? A growth at `step` comes right after it."""
    return record["step"] < step if record["kind"] == "growth" else record["step"] <= step


def trim_metrics(source, dest, step):
    """Write to dest the records of source logged up to the checkpoint at `step` (what comes after is about
    to be redone; a growth at `step` itself happened after the checkpoint was written)."""
    kept = [r for r in read_metrics(source.parent) if logged_by(r, step)] if source.exists() else []
    atomic_write(dest, lambda f: f.write("".join(json.dumps(r) + "\n" for r in kept).encode()))


# ---------------------------------------------------------------------------------------------
# Devices, processes, memory
# ---------------------------------------------------------------------------------------------


def setup_distributed(device_setting, world):
    """(rank, device). Under torchrun (it sets RANK, WORLD_SIZE, LOCAL_RANK) a process group is set up even
    for one process, so `torchrun --nproc_per_node=1` runs the multi-GPU code path: NCCL on GPU, gloo on CPU."""
    device = resolve_device(device_setting)
    if "RANK" not in os.environ:
        return 0, torch.device(device)
    rank, local = int(os.environ["RANK"]), int(os.environ["LOCAL_RANK"])
    if device.startswith("cuda"):
        torch.cuda.set_device(local)
        dist.init_process_group("nccl", device_id=torch.device("cuda", local))
        return rank, torch.device("cuda", local)
    dist.init_process_group("gloo")
    return rank, torch.device("cpu")


def autocast_dtype(s, device):
    """bf16 autocast on CUDA by default; --dtype=bf16 on a CPU emulates the GPU path's numerics."""
    bf16 = s.dtype == "bf16" or (s.dtype == "auto" and device.type == "cuda")
    return torch.bfloat16 if bf16 else None


def autocast(device, dtype):
    return torch.autocast(device.type, dtype=dtype) if dtype is not None else nullcontext()


def make_optimizer(raw, s, device):
    """AdamW; matrices decay, norms and other vectors do not."""
    params = [p for p in raw.parameters() if p.requires_grad]
    groups = [{"params": [p for p in params if p.dim() >= 2], "weight_decay": s.weight_decay},
              {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=s.lr, betas=(s.beta1, s.beta2), fused=device.type == "cuda")


def wrap(raw, s, device):
    """torch.compile and DDP around the model: done once per stage, since growth changes the shapes."""
    if s.compile:
        # drop the last stage's graphs: dead after growth, and they count toward dynamo's recompile limit
        # (8 per function), past which a 5-stage run's last stages silently ran uncompiled
        torch._dynamo.reset()
    model = torch.compile(raw, dynamic=False) if s.compile else raw
    if dist.is_initialized():
        # broadcast_buffers=False: each rank keeps its own expert counts until update_router_bias sums them
        model = DDP(model, device_ids=[device.index] if device.type == "cuda" else None, broadcast_buffers=False)
    return model


def mean_over_ranks(t):
    """The mean of tensor t over data-parallel ranks, in float64 on t's own device: NCCL, the CUDA process
    group, has no CPU backend, so a collective must never be handed a CPU tensor there."""
    t = t.detach().double()
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(t)
        t /= dist.get_world_size()
    return t


def per_rank(value):
    """A Python number from every rank, in rank order (one item when not distributed): for what ranks must
    share (the weights) or must not (their batches)."""
    if not dist.is_initialized():
        return [value]
    everyone = [None] * dist.get_world_size()
    dist.all_gather_object(everyone, value)
    return everyone


# Dense bf16 peak FLOP/s by CUDA device name, most specific first (the vendors' data sheets, without sparsity)
PEAK_BF16_FLOPS = (("H100 NVL", 835e12), ("H100 PCIe", 756e12), ("H100", 989e12), ("H200 NVL", 835e12),
                   ("H200", 989e12), ("B200", 2250e12), ("A100", 312e12))


def peak_flops(device):
    """Dense bf16 peak FLOP/s of a CUDA device, or None where we do not know it (CPU, other GPUs)."""
    device = torch.device(device)
    return peak_flops_of(torch.cuda.get_device_name(device)) if device.type == "cuda" else None


def peak_flops_of(name):
    """Dense bf16 peak FLOP/s for a CUDA device name such as 'NVIDIA H100 PCIe'; None for names not listed."""
    return next((flops for key, flops in PEAK_BF16_FLOPS if key in name), None)


def mfu(tokens_per_second, cfg, device):
    """Model FLOPs utilisation from active parameters, or None on devices without a known peak."""
    peak = peak_flops(device)
    return None if peak is None else tokens_per_second * emo.flops_per_token(cfg) / peak


def _glibc():
    """The C library, where it is glibc (mallopt, malloc_trim); None elsewhere."""
    import ctypes
    import ctypes.util

    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        return libc if hasattr(libc, "malloc_trim") else None
    except OSError:
        return None


def keep_freed_memory():
    """Ask glibc to keep freed memory in the process instead of returning each large block to the OS.

    Training allocates and frees the same large activations every step; by default glibc maps each block
    over 32 MB fresh and unmaps it on free, so every step pays page faults. On a 2-core CPU that was half
    the MoE layer's time (bench.py moe: system time 26 s -> 2 s, E=128 tokens/s 1.8x). No-op off glibc.
    """
    libc = _glibc()
    if libc:
        libc.mallopt(-3, 1 << 30)  # M_MMAP_THRESHOLD: serve blocks up to 1 GiB from the heap
        libc.mallopt(-1, 2**31 - 1)  # M_TRIM_THRESHOLD: never shrink the heap


def reset_peak_memory(device):
    """Start a peak-memory window: CUDA's allocator peak, or on Linux the process's peak resident set
    (writing 5 to /proc/self/clear_refs resets VmHWM). Returns False where neither can be reset."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        return True
    libc = _glibc()
    if libc:
        libc.malloc_trim(0)  # give back what keep_freed_memory kept, else the window starts at that heap
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


# ---------------------------------------------------------------------------------------------
# Data and evaluation
# ---------------------------------------------------------------------------------------------


def open_data(s, cfg, rank, world):
    """The train and val splits, checked against the model; the default corpus is prepared if missing."""
    folder = Path(s.data)
    if not (folder / "meta.json").exists() and folder.resolve() == DEFAULT_FOLDER.resolve():
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


@torch.no_grad()
def evaluate(model, data, s, cfg, device, dtype, rank, world):
    """Validation loss over eval_batches fixed batches, overall and per domain: nats per token ("loss") and
    bits per byte ("bpb": the loss of the tokens that stand for text / (ln 2 * their UTF-8 bytes), which
    compares across tokenizers)."""
    model.eval()
    sums = torch.zeros(4, len(data.domains), dtype=torch.float64, device=device)  # loss, tokens, text loss, bytes
    domain_of, bytes_of = torch.from_numpy(data.doc_domain), data.token_bytes()
    for i in range(s.eval_batches):
        x, y, doc = data.batch(i, s.batch_size, cfg.seq_len, seed=0, rank=rank, world_size=world, with_docs=True)
        with autocast(device, dtype):
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


# ---------------------------------------------------------------------------------------------
# The training step
# ---------------------------------------------------------------------------------------------


class NonFiniteLoss(TrainingError):
    """The loss or the gradient norm is NaN or infinite: the step was not taken."""


def train_step(model, optimizer, micro_batches, lr, grad_clip, dtype):
    """One optimizer step: forward and backward over the micro-batches (DDP syncs gradients on the last),
    gradient clipping, AdamW, then the balancing update. A non-finite loss or gradient raises NonFiniteLoss
    before anything changes, so the weights stay those of the last good step.
    micro_batches: [(x, y)] on the model's device. Returns (loss, cross-entropy, gradient norm, expert
    loads [n_layer, E]), the losses averaged over micro-batches and ranks."""
    raw = emo.unwrap(model)
    for group in optimizer.param_groups:
        group["lr"] = lr
    loss_sum = ce_sum = 0.0
    for i, (x, y) in enumerate(micro_batches):
        last = i == len(micro_batches) - 1
        with (model.no_sync() if isinstance(model, DDP) and not last else nullcontext()), autocast(x.device, dtype):
            losses = model(x, y)
        (losses["loss"] / len(micro_batches)).backward()
        loss_sum += losses["loss"].detach()
        ce_sum += losses["ce"].detach()
    grad_norm = torch.nn.utils.clip_grad_norm_(raw.parameters(), grad_clip or float("inf"))
    loss_value, ce_value = mean_over_ranks(torch.stack([loss_sum, ce_sum]).double() / len(micro_batches)).tolist()
    if not (math.isfinite(loss_value) and math.isfinite(grad_norm.item())):
        optimizer.zero_grad(set_to_none=True)
        for moe in raw.moe_layers():  # forget this step's routing counts too: nothing of it remains
            moe.router.expert_counts.zero_()
        raise NonFiniteLoss(f"loss {loss_value}, gradient norm {grad_norm.item()}")
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    loads = emo.update_router_bias(raw)
    return loss_value, ce_value, grad_norm, loads


# ---------------------------------------------------------------------------------------------
# The run
# ---------------------------------------------------------------------------------------------


class StoppedMidStep(Exception):
    """A signal arrived while a step was being computed (torch.compile building, say) and broke it."""


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

    def agreed(self, device):
        """All ranks stop at the same step if any one was signalled."""
        if not dist.is_initialized():
            return self.requested
        flag = torch.tensor([float(self.requested)], device=device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return bool(flag.item())


class Trainer:
    """One run: the model, its optimizer, the stage plan, the data and the run folder. run() is the loop;
    each of its steps is a method below, in the order the loop calls them."""

    def __init__(self, s, cfg, stages, world, resume=None):
        self.s, self.stages, self.world = s, stages, world
        self.micro_tokens = s.batch_size * cfg.seq_len * world
        self.batch_tokens = s.batch_tokens or self.micro_tokens
        self.accum = self.batch_tokens // self.micro_tokens
        self.total_steps = stages[-1].end
        self.out_dir = Path(s.out_dir)
        self.lock = self.metrics = None
        self.preemption = Preemption()  # from here on a signal stops the run cleanly, during compilation too
        self.rank, self.device = setup_distributed(s.device, world)
        self.dtype = autocast_dtype(s, self.device)
        self.master = self.rank == 0
        created = not self.out_dir.exists()
        try:
            if self.master:  # a branch from another run's checkpoint is a new run in its folder
                self.lock = claim_folder(self.out_dir, resuming=resume is not None and not resume[2])
            self.train_data, self.val_data = open_data(s, cfg, self.rank, world)
            repeats = epochs_warning(s, self.train_data)
            if repeats:
                self.log(f"warning: {repeats}")
            torch.manual_seed(s.seed)
            keep_freed_memory()
            self.raw = emo.Transformer(cfg).to(self.device)
            self.optimizer = make_optimizer(self.raw, s, self.device)
            self.step, self.retained = 0, []
            self.data = fingerprint(s.data)  # what this run trains on, kept in every checkpoint
            # a run continued in place keeps its id; a new run, or a branch, gets its own
            self.run_id = resume[0]["run"] if resume and not resume[2] else uuid.uuid4().hex
            if resume:
                self.restore(resume)
            self.model = wrap(self.raw, s, self.device)
            self.log(json.dumps({"settings": asdict(s), "model": asdict(cfg)}))
            self.log("stages: " + ", ".join(f"E={st.experts} steps {st.start}-{st.end}" for st in stages)
                     + f" ({self.total_steps} steps of {self.batch_tokens} tokens, {self.accum} micro-batches each)")
            if self.master:  # every check passed: only now does the folder hold a run
                config = {"run": self.run_id, "settings": asdict(s), "model": asdict(cfg),
                          "stages": [asdict(st) for st in stages]}
                atomic_write(self.out_dir / "config.json", lambda f: f.write(json.dumps(config, indent=1).encode()))
                self.metrics = open_for_append(self.out_dir / "metrics.jsonl")
        except BaseException:
            self.close()
            if self.master and created and self.out_dir.is_dir() and set(os.listdir(self.out_dir)) <= {".lock"}:
                shutil.rmtree(self.out_dir)
            raise
        self.idle = torch.zeros(0)  # per layer and expert: steps since it last got a token
        self.cost = None  # this stage's training time, tokens and peak memory in this process (since a resume)
        self.clock = dict(start=time.time(), start_step=self.step, last=time.time(), tokens=0)

    def log(self, text):
        if self.master:
            print(text)

    def record(self, kind, **values):
        if self.metrics:
            try:
                self.metrics.write(json.dumps({"kind": kind, **values}) + "\n")
                self.metrics.flush()
            except OSError as err:
                path = self.out_dir / "metrics.jsonl"
                raise TrainingError(f"cannot write {path}: {why_not_written(err, path)}") from None

    def restore(self, resume):
        """Weights, optimizer, step, RNG and retention list from a checkpoint; a branch starts with the
        source's metrics up to the checkpoint, a run continued in place drops what came after it."""
        state, path, branching = resume
        load_weights(self.raw, state["model"], path)
        try:
            self.optimizer.load_state_dict(state["optimizer"])
        except (ValueError, KeyError, RuntimeError) as err:
            raise SettingError(f"--resume={path}: its optimizer state does not fit the model ({err}): corrupt") from None
        self.step = state["step"]
        self.retained = [] if branching else list(state["retained"])
        restore_rng(state["rng"], self.rank, self.device)
        del state["model"], state["optimizer"]  # loaded: a copy kept for the whole run would double host memory
        if self.master:
            trim_metrics(path.parent / "metrics.jsonl", self.out_dir / "metrics.jsonl", self.step)
        self.log(f"resumed from {path} at step {self.step} (E={self.raw.config.n_experts})"
                 + (f"; writing to {self.out_dir}" if branching else ""))

    def run(self):
        """Train to the end, or until a signal or --stop_at; returns True when the run finished."""
        try:
            try:
                return self.loop()
            except StoppedMidStep as err:
                last = self.out_dir / "latest.pt"
                self.log(f"{err}; " + (f"resume with: python train.py --resume={self.out_dir}" if last.exists() else
                                       "no checkpoint yet: run the same command again to start over"))
                return False
        finally:  # also when the run stops on an error: give back the signal handlers, the log, the lock
            self.close()

    def loop(self):
        """Stage by stage (grow at its first step), step by step, until the end, a signal or --stop_at; True
        when the run finished."""
        for stage in self.stages:
            if self.step >= stage.end:  # a resumed run: this stage is done
                continue
            self.grow_if_due(stage)
            while self.step < stage.end:
                loss, ce, grad_norm, loads = self.train(stage)
                self.log_step(stage, loss, ce, grad_norm, loads)
                stage_end = self.step == stage.end
                if self.step % self.s.eval_interval == 0 or stage_end:
                    val = self.evaluate(stage)
                    if stage_end:
                        self.end_stage(stage, val)
                stop = bool(self.s.stop_at and self.step >= self.s.stop_at)
                preempted = self.preemption.agreed(self.device)
                periodic = self.s.checkpoint_interval and self.step % self.s.checkpoint_interval == 0
                if periodic or stage_end or stop or preempted or self.step == self.total_steps:
                    self.checkpoint(stage if stage_end else None)
                if stop or preempted:
                    self.log(f"stopped at step {self.step} ({'signal' if preempted else '--stop_at'}); resume "
                             f"with: python train.py --resume={self.out_dir}")
                    return False
        self.finish()
        return True

    def grow_if_due(self, stage):
        """At a stage's first step: grow the experts, fit the optimizer to them, re-wrap, and evaluate once
        (the spike growth itself causes)."""
        if self.cost is None or self.cost["stage"] != stage.index:
            self.cost = dict(stage=stage.index, seconds=0.0, tokens=0, tracked=reset_peak_memory(self.device))
        if self.raw.config.n_experts == stage.experts:
            return
        t0, old = time.time(), self.raw.config.n_experts
        emo.grow_experts(self.raw, stage.experts, init=self.s.growth_init)
        emo.grow_optimizer(self.optimizer, self.s.growth_optimizer)
        self.model = wrap(self.raw, self.s, self.device)
        seconds = time.time() - t0
        val = evaluate(self.model, self.val_data, self.s, self.raw.config, self.device, self.dtype, self.rank,
                       self.world)
        self.log(f"step {self.step}: grew E {old} -> {stage.experts} ({self.s.growth_init} init, optimizer "
                 f"{self.s.growth_optimizer}) in {seconds:.2f}s; val loss right after: {val['loss']:.4f}")
        # what data parallelism rests on, seen where it can break: every rank drew the same new experts, and
        # each reads its own share of the data
        weights = sum(p.detach().double().sum().item() for p in self.raw.parameters())
        x, _ = self.train_data.batch(self.step * self.accum, self.s.batch_size, self.raw.config.seq_len, self.s.seed,
                                     self.rank, self.world)
        self.record("growth", step=self.step, stage=stage.index, experts_from=old, experts=stage.experts,
                    init=self.s.growth_init, seconds=seconds, val_loss=val["loss"], val_bpb=val["bpb"],
                    weights_per_rank=per_rank(weights), tokens_per_rank=per_rank(int(x.sum())))

    def train(self, stage):
        """One optimizer step on this step's micro-batches; a non-finite loss stops the run, weights untouched."""
        s, cfg = self.s, self.raw.config
        lr = lr_at(self.step, s, self.total_steps, stage)
        batches = [self.train_data.batch(self.step * self.accum + i, s.batch_size, cfg.seq_len, s.seed, self.rank,
                                         self.world) for i in range(self.accum)]
        t0 = time.time()
        try:
            loss, ce, grad_norm, loads = train_step(self.model, self.optimizer,
                                                    [(x.to(self.device), y.to(self.device)) for x, y in batches],
                                                    lr, s.grad_clip, self.dtype)
        except Exception as err:
            if not isinstance(err, NonFiniteLoss):
                if self.preemption.requested:  # a signal to the process group killed the compiler's workers
                    raise StoppedMidStep(f"stopped by a signal during step {self.step + 1} ({type(err).__name__} "
                                         f"in the step it interrupted); the step was not taken") from None
                raise
            last = self.out_dir / "latest.pt"
            where = f"resume it with a lower learning rate: python train.py --resume={self.out_dir} --lr={s.lr / 4:g}" \
                if last.exists() else "start again with a lower --lr"
            raise TrainingError(f"non-finite loss or gradient at step {self.step + 1} (stage {stage.index}, "
                                f"E={stage.experts}; {err}); the step was not taken. Last checkpoint: "
                                f"{last if last.exists() else 'none yet'}; {where}") from None
        self.cost["seconds"] += time.time() - t0  # train_step ends on .item(): the GPU work is done
        self.cost["tokens"] += self.batch_tokens
        self.step += 1
        self.clock["tokens"] += self.batch_tokens
        self.lr = lr
        return loss, ce, grad_norm, loads

    def log_step(self, stage, loss, ce, grad_norm, loads):
        """The step's record, router-collapse warnings, and the progress line every log_interval steps."""
        s, step = self.s, self.step
        self.idle = (self.idle + 1) * (loads == 0) if self.idle.shape == loads.shape else (loads == 0).long()
        for warning in collapse_warnings(self.idle, loads, s, check_cv=step % s.log_interval == 0):
            self.log(f"step {step}: warning: {warning}")
            self.record("warning", step=step, message=warning)
        new_from = self.stages[stage.index - 2].experts if stage.index > 1 else stage.experts
        self.record("step", step=step, stage=stage.index, experts=stage.experts, loss=loss, ce=ce, lr=self.lr,
                    grad_norm=grad_norm.item(), tokens=step * self.batch_tokens,
                    load_cv=(loads.std(dim=1) / loads.mean(dim=1)).mean().item(),
                    new_share=(loads[:, new_from:].sum() / loads.sum()).item())
        if step % s.log_interval == 0 or step == self.total_steps:
            clock, now = self.clock, time.time()
            tps = clock["tokens"] / (now - clock["last"])
            util = mfu(tps / self.world, self.raw.config, self.device)
            eta = (now - clock["start"]) / (step - clock["start_step"]) * (self.total_steps - step)
            self.log(f"step {step}/{self.total_steps} | stage {stage.index}/{len(self.stages)} E={stage.experts} | "
                     f"loss {loss:.4f} | lr {self.lr:.2e} | {tps:,.0f} tok/s | mfu "
                     f"{'-' if util is None else f'{util:.1%}'} | eta {eta / 60:.1f} min")
            clock["last"], clock["tokens"] = time.time(), 0

    def evaluate(self, stage):
        val = evaluate(self.model, self.val_data, self.s, self.raw.config, self.device, self.dtype, self.rank,
                       self.world)
        self.log(f"step {self.step}: val loss {val['loss']:.4f}, {val['bpb']:.4f} bits per byte | "
                 + " ".join(f"{d} {v:.3f}" for d, v in val["bpb_per_domain"].items()))
        self.record("eval", step=self.step, stage=stage.index, experts=stage.experts, val_loss=val["loss"],
                    val_bpb=val["bpb"], val_loss_per_domain=val["loss_per_domain"],
                    val_bpb_per_domain=val["bpb_per_domain"])
        return val

    def end_stage(self, stage, val):
        """The stage's summary record: what plan.py --fit reads, and what the stage cost."""
        raw, cost = self.raw, self.cost
        self.record("stage", step=self.step, stage=stage.index, experts=stage.experts, top_k=raw.config.top_k,
                    n_active=raw.num_params(active=True), law_n_active=emo.law_active_params(raw.config),
                    params_total=raw.num_params(), tokens=self.step * self.batch_tokens, val_loss=val["loss"],
                    val_bpb=val["bpb"],
                    seconds=time.time() - self.clock["start"], train_seconds=cost["seconds"],
                    tokens_per_second=cost["tokens"] / cost["seconds"],
                    peak_memory=peak_memory(self.device) if cost["tracked"] else None,
                    state_memory=state_memory(raw, self.optimizer))

    def checkpoint(self, ended_stage):
        """latest.pt; at a stage end also stageN.pt; with --keep_latest=N > 1 the N newest as stepS.pt. All
        are hard links of one write. Retention removes only stepS.pt files this run wrote (the checkpoint
        lists them), so a user's own files in the folder are never touched."""
        rng = rng_states(self.device)
        if self.master:
            self.save(ended_stage, rng)
        if dist.is_initialized():
            # no rank goes on (or exits, at a stop) before the file is written: torchrun ends every rank when
            # one exits with a non-zero status, rank 0 mid-write included
            dist.barrier()

    def save(self, ended_stage, rng):
        out, step, n = self.out_dir, self.step, self.s.keep_latest
        link = out / f"step{step}.pt"
        keep = n > 1 and (step in self.retained or not link.exists())  # never replace a file we did not write
        if n > 1 and not keep:
            self.log(f"step {step}: warning: {link} exists and was not written by this run: not replaced")
        retained = (self.retained + ([step] if keep and step not in self.retained else []))[-n:] if n > 1 else []
        save_checkpoint(out / "latest.pt", self.raw, self.optimizer, self.s, step, self.world, retained, rng,
                        self.run_id, self.data)
        if ended_stage:
            link_atomically(out / "latest.pt", out / f"stage{ended_stage.index}.pt")
        if keep:
            link_atomically(out / "latest.pt", link)
        for old in set(self.retained) - set(retained):
            (out / f"step{old}.pt").unlink(missing_ok=True)
        self.retained = retained

    def finish(self):
        """The end of a finished run: a text sample and the loss plot."""
        if self.master and self.s.sample_tokens:
            self.log("sample: " + repr(sample(self.raw, self.train_data.encoding(), self.s.sample_tokens,
                                              self.device, self.dtype)))
        if self.master:  # record() flushed every line: the plot reads them all
            self.log(plot_losses({self.out_dir.name: self.out_dir}, self.out_dir / "loss.png"))
        if dist.is_initialized():  # wait for rank 0's sample and plot: a rank that tears down gloo early can abort
            dist.barrier()

    def close(self):
        if self.preemption:
            self.preemption.restore()
        if self.metrics:
            self.metrics.close()
        if self.lock:
            self.lock.close()
        if dist.is_initialized():
            dist.destroy_process_group()


def pyplot():
    """matplotlib.pyplot for writing PNGs, or None: matplotlib is optional."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    return plt


def plot_losses(runs, png, title="validation bits per byte (dotted: expert growth)"):
    """Validation bits per byte (validation loss for runs that did not record it) against tokens: the whole
    run, and beside it the last 40 % zoomed in, where the arms part. runs: {label: run folder, or a list of
    them (seeds: thin lines and their mean in bold)}; a dotted line at each growth of a label's first run.
    matplotlib is optional: without it this writes nothing and says so."""
    plt = pyplot()
    if plt is None:
        return f"no {png}: matplotlib is not installed (optional: pip install matplotlib)"
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    lines, bpb = [], True  # (color, x, y, width, label) for both panels; did every run record bits per byte
    for i, (label, folders) in enumerate(runs.items()):
        color, curves = f"C{i % 10}", []
        for n, folder in enumerate(folders if isinstance(folders, list) else [folders]):
            records = read_metrics(folder)
            tokens = {0: 0, **{r["step"]: r["tokens"] for r in records if r["kind"] == "step"}}
            evals = [r for r in records if r["kind"] == "eval"]
            bpb = bpb and all("val_bpb" in r for r in evals)
            curves.append({tokens[r["step"]]: r.get("val_bpb", r["val_loss"]) for r in evals})
            for growth in (r for r in records if r["kind"] == "growth" and n == 0):
                for ax in axes:
                    ax.axvline(tokens[growth["step"]], color=color, linestyle=":", linewidth=1)
        common = sorted(set.intersection(*map(set, curves)))
        if len(curves) > 1:
            lines += [(color, list(c), list(c.values()), 0.6, None) for c in curves]
        lines.append((color, common, [sum(c[t] for c in curves) / len(curves) for t in common], 1.8,
                      label + (f" ({len(curves)} seeds)" if len(curves) > 1 else "")))
    end = max(max(x) for _, x, _, _, _ in lines)
    late = [v for _, x, y, _, _ in lines for t, v in zip(x, y) if t >= 0.6 * end]
    for ax in axes:
        for color, x, y, width, label in lines:
            ax.plot(x, y, color=color, linewidth=width, alpha=1.0 if label else 0.5, label=label)
        ax.set(xlabel="tokens", ylabel="validation " + ("bits per byte" if bpb else "loss (bits per byte where recorded)"))
    low = min(y for _, _, ys, _, label in lines if label for y in ys)
    axes[0].set_ylim(low - 0.05, low + 1.2)  # the first evals would flatten the rest
    axes[0].set_title(title, fontsize=10)
    axes[1].set_xlim(0.6 * end, end * 1.01)
    axes[1].set_ylim(min(late) - 0.01, max(late) + 0.01)
    axes[1].set_title("the last 40 % of tokens", fontsize=10)
    axes[1].legend(fontsize=8)
    fig.savefig(png, dpi=80, bbox_inches="tight")
    plt.close(fig)
    return f"wrote {png}"


def sample(raw, enc, n_tokens, device, dtype):
    """n_tokens sampled after an indented "def" (temperature 0.8, top-50), decoded with the corpus's tokenizer.
    No trailing space in the prompt: GPT-2's tokens carry their leading space, so a lone " " token is rare in
    training text and a prompt ending in one draws more spaces."""
    prompt = torch.tensor([enc.encode_ordinary("    def")], device=device)
    raw.eval()
    with autocast(device, dtype):
        out = raw.generate(prompt, n_tokens, temperature=0.8, top_k=50)
    raw.train()
    return enc.decode([t for t in out[0].tolist() if t < enc.n_vocab])


def size_for_corpus(model_settings, data):
    """The model's vocabulary and end-of-text id default to the corpus's (from its meta.json), so nothing has
    to be kept in sync by hand; the vocabulary is padded to a multiple of 64 (faster matmuls)."""
    vocab, eot = vocabulary(data)
    model_settings.setdefault("vocab_size", -(-vocab // 64) * 64)
    model_settings.setdefault("eot_id", eot)


def setup(argv):
    """Flags -> (Settings, Config, stages, world size, resume) with every check that needs no data or device.
    resume: None, or (checkpoint state, its path, whether the run branches into a new folder)."""
    s, model_settings, given = parse(argv)
    world = int(os.environ.get("WORLD_SIZE", "1"))
    resume = None
    if s.resume:
        state, path = load_checkpoint(s.resume)
        s, model_settings = resumed_settings(state, s, model_settings, given)
        if state["world_size"] != world:
            raise SettingError(f"--resume={path}: the run used {state['world_size']} process(es), this one has "
                               f"{world}: resume with the same torchrun --nproc_per_node (the data order and the "
                               f"batch depend on it)")
        require(len(state["rng"]) == world, f"--resume={path}: its random states", len(state["rng"]),
                f"one per process, {world} (corrupt or edited)")
        changed = (Path(s.data) / "meta.json").exists() and fingerprint_change(state["data"], fingerprint(s.data))
        if changed:
            raise SettingError(f"--resume={path}: the corpus in {s.data} is not the one the run was trained on "
                               f"({changed}): a run resumes on its own data; prepare that again, or start a new run")
        out_dir, branching = resume_destination(path, state, s, given)
        s.out_dir = str(out_dir)
        resume = (state, path, branching)
    experts, fractions = parse_stages(s)
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
        raise SettingError(f"--resume={resume[1]}: its model config: {err}") if resume else err from None
    validate(s, cfg, world, len(experts))
    micro_tokens = s.batch_size * cfg.seq_len * world
    stages = plan_schedule(s, cfg, s.batch_tokens or micro_tokens, experts, fractions)
    if resume:
        step = resume[0]["step"]
        require(step <= stages[-1].end, f"--resume={resume[1]}: its step", step,
                f"at most the run's last step {stages[-1].end} (corrupt or edited)")
        require(cfg.n_experts == next((st.experts for st in stages if st.start <= step < st.end), stages[-1].experts)
                or any(st.start == step for st in stages), f"--resume={resume[1]}: its E", cfg.n_experts,
                f"the E its schedule gives at step {step} (corrupt or edited)")
        require(not s.stop_at or s.stop_at > step, "--stop_at", s.stop_at,
                f"after the checkpoint's step {step} (or 0: no stop)")
    return s, cfg, stages, world, resume


def timed_step(argv, n_experts):
    """train.py's model, optimizer and training step at E = n_experts, for bench.py: the settings, wrappers
    (dtype, compile) and step of a run with these flags, on random tokens (timing needs tokens, not text).
    Returns (raw model, optimizer, device, step) where step(i) takes one optimizer step on batch i."""
    s, model_settings, _ = parse(argv)
    size_for_corpus(model_settings, s.data)
    cfg = emo.Config(**{**model_settings, "n_experts": n_experts})
    validate(s, cfg, 1, 1)
    _, device = setup_distributed(s.device, 1)
    dtype = autocast_dtype(s, device)
    torch.manual_seed(0)
    raw = emo.Transformer(cfg).to(device)
    optimizer = make_optimizer(raw, s, device)
    model = wrap(raw, s, device)

    def step(i):
        tokens = torch.randint(cfg.vocab_size, (s.batch_size, cfg.seq_len + 1), generator=torch.Generator().manual_seed(i))
        tokens = tokens.to(device)
        return train_step(model, optimizer, [(tokens[:, :-1], tokens[:, 1:])], s.lr, s.grad_clip, dtype)

    return raw, optimizer, device, step


def run(argv):
    """Train as the flags say; returns (the model, whether the run finished)."""
    s, cfg, stages, world, resume = setup(argv)
    trainer = Trainer(s, cfg, stages, world, resume)
    finished = trainer.run()
    return trainer.raw, finished


def main(argv=None):
    try:
        _, finished = run(sys.argv[1:] if argv is None else argv)
    except (SettingError, DataError, TrainingError) as err:
        sys.exit(f"train.py: {err}")
    if not finished:
        sys.exit(EXIT_STOPPED)


if __name__ == "__main__":
    main()

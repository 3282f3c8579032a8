"""The run machinery behind train.py, kept out of the training loop: flags and config files, the run folder
and its lock, atomic files, checkpoints and the rules for resuming them, metrics.jsonl, devices, processes and
signals. What a run reports of itself is in report.py. bench.py and eval.py use both.

A run folder holds config.json, metrics.jsonl, latest.pt, stageN.pt (and stepN.pt with --keep_latest); one
process at a time owns it (.lock). Checkpoints load with weights_only=True and are checked field by field. A
sharded run's (--shard=fsdp) checkpoint files name a folder in shards/ that holds its weights and AdamW moments,
each rank's part written by that rank (torch.distributed.checkpoint).
"""

import errno
import fcntl
import json
import math
import os
import re
import shlex
import shutil
import signal
import warnings
from contextlib import nullcontext
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict, get_optimizer_state_dict,
                                                     set_model_state_dict, set_optimizer_state_dict)
from torch.distributed.fsdp import FSDPModule

import emo
import folders
from data.corpus import DataError, fingerprint, fingerprint_change
from emo import SettingError, require

EXIT_STOPPED = 75  # EX_TEMPFAIL: stopped before the end on purpose; `--resume` continues it


class TrainingError(RuntimeError):
    """The run cannot go on (a non-finite loss, a full disk): printed as one line naming what to do."""


# ---------------------------------------------------------------------------------------------
# The run folder: one owner, atomic files
# ---------------------------------------------------------------------------------------------


def claim_folder(out_dir, resuming):
    """Make out_dir this run's own: create it, refuse a file or a read-only folder, refuse a new run into a
    folder that holds one, and lock it against a second process (the lock dies with the process, kill -9
    included). Returns the open lock file, to keep for the run's lifetime."""
    why = folders.nesting_problem(out_dir, {"run", "arm"})
    if why:
        raise SettingError(f"--out_dir={out_dir} {why}: give another --out_dir")
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise SettingError(f"--out_dir={out_dir}: cannot create it ({err.strerror})") from None
    if not os.access(out_dir, os.W_OK | os.X_OK):
        raise SettingError(f"--out_dir={out_dir} is not writable")
    if (out_dir / ".lock").is_dir():
        raise SettingError(f"--out_dir={out_dir}: {out_dir / '.lock'} is a folder, where train.py keeps its lock "
                           f"file: move it, or give another --out_dir")
    lock, owner = take_lock(out_dir / ".lock")
    if lock is None:
        raise SettingError(f"--out_dir={out_dir}: another training process (pid {owner}) is running there; wait "
                           f"for it or give another --out_dir")
    try:  # unbuffered, so that closing the file later never has a write left to fail
        os.ftruncate(lock.fileno(), 0)
        os.write(lock.fileno(), str(os.getpid()).encode())
    except OSError as err:
        lock.close()
        raise SettingError(f"--out_dir={out_dir}: cannot write there: {why_not_written(err, out_dir / '.lock')}") from None
    ours = sorted(p for p in out_dir.iterdir()
                  if folders.RUN_FILE.fullmatch(p.name) or folders.TEMP_NAME.fullmatch(p.name))
    if not resuming and ours and not never_checkpointed(out_dir, ours):
        lock.close()
        if (out_dir / "latest.pt").exists() or run_id(out_dir):
            raise SettingError(f"--out_dir={out_dir} already holds a run: continue it with --resume={out_dir}, or "
                               f"start over in another --out_dir (or delete this folder first)")
        raise SettingError(f"--out_dir={out_dir} holds {ours[0].name}, which a run writes: give another --out_dir "
                           f"(or move your file)")
    for path in ours:  # a new run: what a run that never checkpointed left; a resume: stale temp files
        if not resuming or folders.TEMP_NAME.fullmatch(path.name):
            path.unlink()
    return lock


def never_checkpointed(out_dir, files):
    """Did these files come from a train.py run that stopped before its first checkpoint (a non-finite loss,
    a kill while compiling)? Then there is nothing to resume, and a new run may start over in the folder."""
    left = {p.name for p in files if not folders.TEMP_NAME.fullmatch(p.name)}
    return "config.json" in left and left <= {"config.json", "metrics.jsonl"} and run_id(out_dir) is not None


def take_lock(path):
    """(the open lock file, None) if this process now holds path's lock, else (None, the holder's pid)."""
    lock = open(path, "a+")
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return lock, None
    except BlockingIOError:
        lock.seek(0)
        owner = lock.read().strip() or "?"
        lock.close()
        return None, owner


def folder_owner(out_dir):
    """The pid of the training process that holds out_dir's lock (claim_folder), or None if none does."""
    path = Path(out_dir) / ".lock"
    if not path.is_file():
        return None
    lock, owner = take_lock(path)
    if lock:
        lock.close()  # closing releases it
    return owner


def run_id(folder):
    """The id in a run folder's config.json, or None where there is none (or it is not train.py's)."""
    try:
        return json.loads((Path(folder) / "config.json").read_text()).get("run")
    except (OSError, ValueError, AttributeError):
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


def finite_or_null(value):
    """JSON has no Infinity or NaN (json.dumps writes them, and its default= hook never sees a float): null."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: finite_or_null(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [finite_or_null(v) for v in value]
    return value


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


# ---------------------------------------------------------------------------------------------
# Checkpoints: everything a resume needs, loadable with weights_only, checked on load
# ---------------------------------------------------------------------------------------------


CHECKPOINT_FORMAT = "emo-checkpoint-4"
CHECKPOINT_KEYS = ("model", "optimizer", "config", "settings", "step", "world_size", "retained", "rng", "run", "data",
                   "ends", "law", "evals")


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
    """This rank's entry of rng_states: its CPU generator, and its own CUDA device's where it trained on one.
    A run resumed on another number of processes takes entry rank mod the count it was saved by."""
    mine = rng[rank % len(rng)]
    torch.set_rng_state(mine["cpu"])
    if device.type == "cuda" and mine["cuda"] is not None:
        torch.cuda.set_rng_state(mine["cuda"], device)


SHARDS = "shards"  # the run folder's sub-folder of sharded checkpoints' weights and moments
SHARD_NAME = re.compile(r"\d+-[0-9a-f]{8}")  # save_shards' names, STEP-ID (.STEP-ID.tmp while being written)


def save_shards(out_dir, step, raw, optimizer):
    """An FSDP2-sharded model's weights and AdamW moments, each rank writing its own part of every tensor
    (torch.distributed.checkpoint), into out_dir/shards/.NAME.tmp, which rank 0 renames to NAME once every rank
    has written: a save killed midway leaves no folder a checkpoint names. NAME (step and a random id, the
    same on every rank) is never reused. Returns NAME. Call on every rank."""
    name = from_rank0(f"{step}-{os.urandom(4).hex()}")
    folder = Path(out_dir) / SHARDS
    dcp.save({"model": get_model_state_dict(raw), "optimizer": get_optimizer_state_dict(raw, optimizer)},
             checkpoint_id=folder / f".{name}.tmp")  # returns on every rank once the last has written
    if dist.get_rank() == 0:
        (folder / f".{name}.tmp").rename(folder / name)
        fsync_folder(folder)
    return name


def shards_of(state, path):
    """The folder of a checkpoint's sharded weights and moments, or None for a checkpoint that holds them."""
    return Path(path).parent / SHARDS / state["shards"] if state.get("shards") else None


def load_shards(raw, optimizer, folder):
    """Weights and, given an optimizer, its AdamW moments from save_shards' folder into raw, sharded or not, in
    any number of processes: each reads the parts of every tensor it keeps (8 ranks' save loads in 1 to
    evaluate or export, or in 2 to go on training)."""
    state = {"model": get_model_state_dict(raw)}
    if optimizer is not None:
        state["optimizer"] = get_optimizer_state_dict(raw, optimizer)
    with warnings.catch_warnings():  # DCP warns at every load in one process, which is what eval.py means to do
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        dcp.load(state, checkpoint_id=folder, no_dist=not dist.is_initialized())
    set_model_state_dict(raw, state["model"])
    if optimizer is not None:
        set_optimizer_state_dict(raw, optimizer, state["optimizer"])


def drop_unnamed_shards(out_dir):
    """Delete the folders in out_dir/shards that no checkpoint in out_dir names (superseded, or a save killed
    midway): only names save_shards makes, and nothing at all when a checkpoint there cannot be read."""
    folder, named = Path(out_dir) / SHARDS, set()
    if not folder.is_dir():
        return
    for path in Path(out_dir).glob("*.pt"):
        try:
            named.add(torch.load(path, map_location="cpu", weights_only=True, mmap=True).get("shards"))
        except Exception:  # unreadable: it might name any of them
            return
    for shard in folder.iterdir():
        name = shard.name.removeprefix(".").removesuffix(".tmp") if shard.name.startswith(".") else shard.name
        if SHARD_NAME.fullmatch(name) and shard.name not in named:
            shutil.rmtree(shard)


def parameter_names(raw, optimizer):
    """The names of the optimizer's parameters in its order (the positions optimizer.state_dict() keys by)."""
    names = {id(p): name for name, p in raw.named_parameters()}
    return [names[id(p)] for group in optimizer.param_groups for p in group["params"]]


def load_optimizer_state(raw, optimizer, state):
    """optimizer.load_state_dict for a state keyed by position; under FSDP2 each rank keeps its own shard."""
    if not isinstance(raw, FSDPModule):
        return optimizer.load_state_dict(state)
    names = parameter_names(raw, optimizer)
    by_name = {"state": {names[i]: v for i, v in state["state"].items()},
               "param_groups": [{**group, "params": [names[i] for i in group["params"]]}
                                for group in state["param_groups"]]}
    set_optimizer_state_dict(raw, optimizer, by_name, options=StateDictOptions(full_state_dict=True))


def save_checkpoint(path, model, optimizer, config, settings, step, world_size, retained, rng, run, data, ends, law,
                    evals, shards=None):
    """Everything a resume needs, as tensors, numbers, strings, lists and dicts (loadable with weights_only);
    model and optimizer: their state dicts, or None with shards, the name of save_shards' folder; run: the
    run's id (config.json has it too), data: the corpus's fingerprint, both checked on resume. The schedule travels as values: ends, each stage's end step as the
    closed loop last moved them; law, the coefficients it plans with (a --law file edited later changes
    nothing); evals, the validation evals it refits to. metrics.jsonl is only a log: a resume never reads its
    state back from it."""
    state = {"format": CHECKPOINT_FORMAT, "model": model, "optimizer": optimizer,
             "config": asdict(config), "settings": asdict(settings), "step": step, "world_size": world_size,
             "retained": list(retained), "rng": rng, "run": run, "data": data, "ends": list(ends),
             "law": {k: float(getattr(law, k)) for k in emo.LAW_COEFFICIENTS}, "evals": [dict(e) for e in evals],
             "shards": shards}
    atomic_write(path, lambda f: torch.save(state, f))


def load_checkpoint(path, flag="--resume", settings_type=None):
    """A checkpoint file, or a run folder's latest.pt, loaded with weights_only=True: a crafted file can only
    fail to load, never run code; every field checked (settings against settings_type, train.Settings).
    Returns (state, the file's path)."""
    path = Path(path)
    if path.is_dir():
        path = path / "latest.pt"
    if not path.is_file():
        if path.name == "latest.pt" and run_id(path.parent):
            raise SettingError(f"{flag}={path.parent}: the run there stopped before its first checkpoint, so there "
                               f"is nothing to resume: run the same command without {flag} to start it over")
        raise SettingError(f"{flag}={path}: no such checkpoint")
    try:
        # mmap: tensors are read from the page cache as they are used, shared by every rank that resumes from
        # the same file, instead of each rank reading its own copy of the whole file into memory
        state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as err:  # any unpickling failure: a corrupt, truncated or foreign (maybe hostile) file
        raise SettingError(f"{flag}={path}: not a loadable emo checkpoint ({type(err).__name__}); corrupt, "
                           f"truncated, or not made by train.py") from None
    if not isinstance(state, dict) or state.get("format") != CHECKPOINT_FORMAT:
        found = state.get("format") if isinstance(state, dict) else type(state).__name__
        older = isinstance(found, str) and found.startswith("emo-checkpoint-")
        raise SettingError(f"{flag}={path}: not an {CHECKPOINT_FORMAT} checkpoint (found {found!r}" +
                           ("; made by an older emo: use the version that wrote it)" if older else ")"))
    missing = [key for key in CHECKPOINT_KEYS if key not in state]
    if missing:
        raise SettingError(f"{flag}={path}: the checkpoint lacks {', '.join(missing)} (corrupt)")
    wrong = next((key for key, ok in checkpoint_field_checks(state, settings_type) if not ok()), None)
    if wrong:
        raise SettingError(f"{flag}={path}: the checkpoint's {wrong!r} is not what train.py writes (corrupt or "
                           f"edited): {str(state[wrong])[:60]}")
    if state.get("shards"):
        if not shards_of(state, path).is_dir():
            raise SettingError(f"{flag}={path}: its weights and moments are in {shards_of(state, path)}, which is "
                               f"missing (a sharded checkpoint is its file and that folder: copy or move both)")
    else:
        check_finite(state["model"], f"{flag}={path}")
    unknown = set(state["config"]) - set(emo.Config.__dataclass_fields__)
    if unknown:
        raise SettingError(f"{flag}={path}: its model config has fields this emo.py does not know: "
                           f"{', '.join(sorted(unknown))} (made by another version?)")
    return state, path


def checkpoint_field_checks(state, settings_type):
    """(field, check) pairs in the order a loader relies on them: each check is a no-argument callable.
    settings_type: the dataclass the checkpoint's settings must fit, field by field, or None."""
    def is_int(v, low):
        return isinstance(v, int) and not isinstance(v, bool) and v >= low

    def is_state(v):
        return torch.is_tensor(v) and v.dtype == torch.uint8

    sharded = state.get("shards") is not None
    return [("shards", lambda: not sharded or (isinstance(state["shards"], str) and SHARD_NAME.fullmatch(state["shards"]))),
            ("model", lambda: state["model"] is None if sharded else
                isinstance(state["model"], dict) and all(map(torch.is_tensor, state["model"].values()))),
            ("optimizer", lambda: state["optimizer"] is None if sharded else isinstance(state["optimizer"], dict)),
            ("config", lambda: isinstance(state["config"], dict)),
            ("settings", lambda: isinstance(state["settings"], dict) and (settings_type is None or all(
                type(state["settings"][f.name]) is type(getattr(settings_type(), f.name))
                for f in fields(settings_type) if f.name in state["settings"]))),
            ("step", lambda: is_int(state["step"], 0)),
            ("world_size", lambda: is_int(state["world_size"], 1)),
            ("retained", lambda: isinstance(state["retained"], list) and all(is_int(v, 1) for v in state["retained"])),
            ("rng", lambda: isinstance(state["rng"], list) and len(state["rng"]) >= 1 and all(
                isinstance(r, dict) and is_state(r.get("cpu")) and (r.get("cuda") is None or is_state(r["cuda"]))
                for r in state["rng"])),
            ("run", lambda: isinstance(state["run"], str)),
            ("ends", lambda: isinstance(state["ends"], list) and len(state["ends"]) >= 1
                and all(is_int(v, 1) for v in state["ends"]) and state["ends"] == sorted(set(state["ends"]))),
            ("law", lambda: isinstance(state["law"], dict) and set(state["law"]) == set(emo.LAW_COEFFICIENTS)
                and all(type(v) is float and math.isfinite(v) for v in state["law"].values())),
            ("evals", lambda: isinstance(state["evals"], list) and all(
                isinstance(e, dict) and is_int(e.get("step"), 0) and is_int(e.get("experts"), 1)
                and type(e.get("val_loss")) is float for e in state["evals"])),
            ("data", lambda: isinstance(state["data"], dict) and isinstance(state["data"].get("domains"), list)
                and isinstance(state["data"].get("tokens"), dict) and isinstance(state["data"].get("sha256"), str))]


def model_from_checkpoint(state, path, **overrides):
    """Rebuild the checkpoint's Transformer (from load_checkpoint); weights that do not fit give one line."""
    try:
        cfg = emo.Config(**{**state["config"], **overrides})
    except SettingError as err:
        raise SettingError(f"{path}: its model config: {err}") from None
    raw = emo.Transformer(cfg)
    if state.get("shards"):
        try:
            load_shards(raw, None, shards_of(state, path))
        except Exception as err:  # torch.distributed.checkpoint's errors name every tensor: one line instead
            raise SettingError(f"{path}: its sharded weights do not load into its config ({type(err).__name__}): "
                               f"corrupt") from None
        check_finite(raw.state_dict(), str(path))
    else:
        load_weights(raw, state["model"], path)
    return raw


def check_finite(state_dict, where):
    """Refuse weights that hold NaN or inf, in one line that says where to go on from."""
    broken = next((name for name, t in state_dict.items() if t.is_floating_point() and not t.isfinite().all()), None)
    if broken:
        raise SettingError(f"{where}: its weight {broken} holds NaN or inf (a damaged file, or saved from a run "
                           f"that diverged): go on from an earlier checkpoint of the run (stageN.pt, stepN.pt)")


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


def resumed_settings(state, s, model, given, resumable, per_invocation, older):
    """The checkpoint's settings (of the dataclass type(s)) and model: flags may change only the `resumable`
    settings, else one clear line; the `per_invocation` ones are this command's, never inherited. older:
    settings added since some checkpoints were written, with the value those runs ran with."""
    try:
        old = type(s)(**{**older, **state["settings"]})
    except TypeError:
        raise SettingError("--resume: the checkpoint's settings are not this train.py's (made by another "
                           "version?)") from None
    changed = [k for k in given if k in type(s).__dataclass_fields__ and k not in resumable
               and getattr(s, k) != getattr(old, k)]
    changed += [k for k in given if k in emo.Config.__dataclass_fields__ and model[k] != state["config"].get(k)]
    if changed:
        raise SettingError("--resume: these settings differ from the checkpoint's and cannot change mid-run: "
                           + ", ".join(f"{k} (checkpoint {state['config'].get(k, getattr(old, k, None))!r})"
                                       for k in changed))
    for k in (given & resumable) | per_invocation:
        setattr(old, k, getattr(s, k))
    return old, dict(state["config"])


def check_resume(state, path, data, out_dir, world):
    """What a resume must meet before anything loads: a batch that the number of processes leaves unchanged,
    the same corpus, and a destination that loses nothing. out_dir: the --out_dir given (else a false value).
    Returns (out_dir, whether the run branches into a new folder)."""
    if state["world_size"] != world and not state["settings"].get("batch_tokens"):
        raise SettingError(f"--resume={path}: the run used {state['world_size']} process(es), this one has "
                           f"{world}, and its step is one micro-batch a process (batch_tokens=0), so the batch "
                           f"depends on the count: resume with the same torchrun --nproc_per_node")
    require(len(state["rng"]) == state["world_size"], f"--resume={path}: its random states", len(state["rng"]),
            f"one per process, {state['world_size']} (corrupt or edited)")
    changed = (Path(data) / "meta.json").exists() and fingerprint_change(state["data"], fingerprint(data))
    if changed:
        raise SettingError(f"--resume={path}: the corpus in {data} is not the one the run was trained on "
                           f"({changed}): a run resumes on its own data; prepare that again, or start a new run")
    return resume_destination(path, state, out_dir)


@dataclass
class Resume:
    """What a resume hands the run: the checkpoint as load_checkpoint read it, its file, and whether the run
    branches into a new folder (a run of its own) or continues in the checkpoint's."""
    state: dict
    path: Path
    branching: bool


def resume_from(resume, raw, optimizer, run):
    """Optimizer moments, this rank's random state and the retention list from a checkpoint whose weights
    load_weights has put in raw (before any sharding), or, from a sharded checkpoint, weights and moments both
    (load_shards, after sharding); returns its step. The loaded state is dropped once copied (a copy kept for
    the run would double host memory)."""
    state, path, branching = resume.state, resume.path, resume.branching
    try:
        if state.get("shards"):
            load_shards(raw, optimizer, shards_of(state, path))
        else:
            load_optimizer_state(raw, optimizer, state["optimizer"])
    except Exception as err:  # a state that does not fit; DCP's errors can name every tensor: one line
        raise SettingError(f"--resume={path}: its {'sharded weights and ' if state.get('shards') else ''}optimizer "
                           f"state does not fit the model ({type(err).__name__}: {str(err)[:200]}): corrupt") from None
    restore_rng(state["rng"], run.rank, run.device)
    run.retained = [] if branching else list(state["retained"])
    del state["model"], state["optimizer"]
    run.log(f"resumed from {path} at step {state['step']} (E={raw.config.n_experts})"
            + (f"; writing to {run.out_dir}" if branching else "")
            + (f"; saved by {state['world_size']} process(es), resumed on {run.world}: each step reads the same "
               f"windows (batch_tokens fixed)" if state["world_size"] != run.world else ""))
    return state["step"]


def check_resume_step(step, path, n_experts, stages, stop_at):
    """The checkpoint's step against the schedule it is resumed into: within the run, at the E the schedule
    gives there, and before any --stop_at."""
    require(step <= stages[-1].end, f"--resume={path}: its step", step,
            f"at most the run's last step {stages[-1].end} (corrupt or edited)")
    require(n_experts == next((st.experts for st in stages if st.start <= step < st.end), stages[-1].experts)
            or any(st.start == step for st in stages), f"--resume={path}: its E", n_experts,
            f"the E its schedule gives at step {step} (corrupt or edited)")
    require(not stop_at or stop_at > step, "--stop_at", stop_at, f"after the checkpoint's step {step} (or 0: no stop)")


def resume_destination(checkpoint, state, out_dir):
    """Where a resumed run writes: the folder it was resumed from, continued in place, which needs that
    folder's newest checkpoint (an older one would overwrite later progress) written by that folder's run;
    or a new out_dir, a branch that starts with the source's metrics up to the checkpoint."""
    source = checkpoint.parent
    out_dir = Path(out_dir) if out_dir else source
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


def log_records(path):
    """(the records of a metrics.jsonl that are whole, the number of lines that are not): a torn, edited or
    foreign line is left out and counted, never an error; a missing or unreadable file has no records."""
    try:
        lines = [line for line in Path(path).read_text(errors="replace").splitlines() if line.strip()]
    except OSError:
        return [], 0
    records = []
    for line in lines:
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(record, dict) and isinstance(record.get("kind"), str) and type(record.get("step")) is int:
            records.append(record)
    return records, len(lines) - len(records)


def trim_metrics(source, dest, step, run):
    """Write to dest the records of source logged up to the checkpoint at `step` (what comes after is about
    to be redone; a growth at `step` itself happened after the checkpoint was written), when source is the
    log of the checkpoint's own run (its folder's config.json names `run`). The log is only a log: a missing,
    foreign or damaged one costs history, never the run. Returns a warning for what was left out, or None."""
    if run_id(source.parent) != run or not source.exists():
        kept, why = [], f"{source} is missing or not this run's log: the metrics start at step {step}"
    else:
        records, damaged = log_records(source)
        kept = [r for r in records if logged_by(r, step)]
        why = f"left out {damaged} damaged line(s) of {source}" if damaged else None
    atomic_write(dest, lambda f: f.write("".join(json.dumps(r) + "\n" for r in kept).encode()))
    return why


# ---------------------------------------------------------------------------------------------
# Devices, processes, signals
# ---------------------------------------------------------------------------------------------


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


def mean_over_ranks(t):
    """The mean of tensor t over data-parallel ranks, in float64 on t's own device: NCCL, the CUDA process
    group, has no CPU backend, so a collective must never be handed a CPU tensor there."""
    t = t.detach().double()
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(t)
        t /= dist.get_world_size()
    return t


def autocast_dtype(dtype, device):
    """--dtype as an autocast dtype: bf16 on CUDA by default; bf16 on a CPU emulates the GPU path's numerics."""
    bf16 = dtype == "bf16" or (dtype == "auto" and device.type == "cuda")
    return torch.bfloat16 if bf16 else None


def autocast(device, dtype):
    return torch.autocast(device.type, dtype=dtype) if dtype is not None else nullcontext()


def from_rank0(value):
    """value as rank 0 has it, on every rank: a decision one process makes for all."""
    if not dist.is_initialized():
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def per_rank(value):
    """A Python number from every rank, in rank order (one item when not distributed): for what ranks must
    share (the weights) or must not (their batches)."""
    if not dist.is_initialized():
        return [value]
    everyone = [None] * dist.get_world_size()
    dist.all_gather_object(everyone, value)
    return everyone


def glibc():
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
    libc = glibc()
    if libc:
        libc.mallopt(-3, 1 << 30)  # M_MMAP_THRESHOLD: serve blocks up to 1 GiB from the heap
        libc.mallopt(-1, 2**31 - 1)  # M_TRIM_THRESHOLD: never shrink the heap


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


# ---------------------------------------------------------------------------------------------
# The run as one process sees it
# ---------------------------------------------------------------------------------------------


class Run:
    """One process's side of a run: its device and rank, the run folder (rank 0 owns its lock and writes
    config.json, metrics.jsonl and the checkpoints), and the signals that stop it. A context manager: the
    lock, the metrics file, the signal handlers and the process group are released however the run ends,
    and a run refused before it wrote anything leaves no folder behind."""

    def __init__(self, out_dir, device, world, new, keep_latest):
        self.out_dir, self.world, self.new, self.keep_latest = Path(out_dir), world, new, keep_latest
        self.device_setting = device
        self.lock = self.metrics = self.preemption = None
        self.retained = []  # the stepS.pt files this run wrote and keeps (--keep_latest)

    def __enter__(self):
        self.preemption = Preemption()  # from here on a signal stops the run cleanly, during compilation too
        self.created = not self.out_dir.exists()
        try:
            self.rank, self.device = setup_distributed(self.device_setting, self.world)
            self.master = self.rank == 0
            if self.master:  # a branch from another run's checkpoint is a new run in its folder
                self.lock = claim_folder(self.out_dir, resuming=not self.new)
        except BaseException:
            self.__exit__(None, None, None)
            raise
        return self

    def __exit__(self, kind, error, traceback):
        self.preemption.restore()
        if self.metrics:
            self.metrics.close()
        if self.lock:
            self.lock.close()
            # refused before it held anything (a folder someone deleted meanwhile has nothing left to remove)
            if self.created and self.out_dir.is_dir() and set(os.listdir(self.out_dir)) <= {".lock"}:
                shutil.rmtree(self.out_dir)
        if dist.is_initialized():
            dist.destroy_process_group()

    def log(self, text):
        if self.master:
            print(text)

    def start(self, config, resumed_from=None, step=0, source_run=None):
        """Every check passed: only now does the folder hold a run. config.json is written; metrics.jsonl is
        continued (a resume in place drops what came after its checkpoint) or started (a branch starts
        with its source's records up to the checkpoint). source_run: the id of the run that wrote the
        checkpoint resumed from."""
        if not self.master:
            return
        if resumed_from:
            why = trim_metrics(resumed_from.parent / "metrics.jsonl", self.out_dir / "metrics.jsonl", step, source_run)
            if why:
                self.log(f"warning: {why}")
        atomic_write(self.out_dir / "config.json", lambda f: f.write(json.dumps(config, indent=1).encode()))
        self.metrics = open_for_append(self.out_dir / "metrics.jsonl")

    def record(self, kind, **values):
        if self.metrics:
            try:
                self.metrics.write(json.dumps(finite_or_null({"kind": kind, **values})) + "\n")
                self.metrics.flush()
            except OSError as err:
                path = self.out_dir / "metrics.jsonl"
                raise TrainingError(f"cannot write {path}: {why_not_written(err, path)}") from None

    def log_broken_step(self, step, err):
        """A signal to the process group killed torch.compile's workers mid-step: a stop, not a crash."""
        self.log(f"stopped by a signal during step {step + 1} ({type(err).__name__} in the step it broke); "
                 + (f"resume with: python train.py --resume={shlex.quote(str(self.out_dir))}"
                    if (self.out_dir / "latest.pt").exists()
                    else "no checkpoint yet: run the same command again to start over"))

    def stop_requested(self):
        """A signal reached any rank: all ranks stop at the same step."""
        return self.preemption.agreed(self.device)

    def checkpoint(self, step, ended_stage, state):
        """latest.pt from state (save_checkpoint's fields but the random states and retention list, which this
        adds); at a stage end also stageN.pt; with --keep_latest=N > 1 the N newest as stepS.pt. All are hard
        links of one write. Retention removes only stepS.pt files this run wrote (the checkpoint lists them),
        so a user's own files in the folder are never touched. Every rank waits for the file: torchrun ends
        all ranks when one exits with a non-zero status, rank 0 mid-write included."""
        rng = rng_states(self.device)
        raw, optimizer = state.pop("raw"), state.pop("optimizer")
        if isinstance(raw, FSDPModule):  # every rank writes its own part: no rank gathers the whole state
            shards, model_state, optimizer_state = save_shards(self.out_dir, step, raw, optimizer), None, None
        else:
            shards, model_state, optimizer_state = None, raw.state_dict(), optimizer.state_dict()
        if self.master:
            self.save(step, ended_stage, {**state, "model": model_state, "optimizer": optimizer_state,
                                          "config": raw.config, "rng": rng, "shards": shards})
            if shards:
                drop_unnamed_shards(self.out_dir)
        if dist.is_initialized():
            dist.barrier()

    def save(self, step, ended_stage, state):
        out, n = self.out_dir, self.keep_latest
        link = out / f"step{step}.pt"
        keep = n > 1 and (step in self.retained or not link.exists())  # never replace a file we did not write
        if n > 1 and not keep:
            self.log(f"step {step}: warning: {link} exists and was not written by this run: not replaced")
        retained = (self.retained + ([step] if keep and step not in self.retained else []))[-n:] if n > 1 else []
        save_checkpoint(out / "latest.pt", step=step, retained=retained, **state)
        if ended_stage:
            link_atomically(out / "latest.pt", out / f"stage{ended_stage}.pt")
        if keep:
            link_atomically(out / "latest.pt", link)
        for old in set(self.retained) - set(retained):
            (out / f"step{old}.pt").unlink(missing_ok=True)
        self.retained = retained

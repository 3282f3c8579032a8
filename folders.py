"""Who made a folder, and so what a command may delete there: the one ownership rule of every emo command.

Each kind of folder holds a file that its command wrote, and that file is the proof that the folder is its own:

    kind     made by              proof
    run      train.py             config.json naming the run's id
    arm      bench.py (one arm)   bench_arm.json (beside the run files train.py writes into it)
    corpus   data/prepare.py      meta.json naming the command that prepared it
    export   eval.py --export     emo_export.json listing every file written

A command replaces or deletes a folder only when it is of the command's own kind and holds nothing but what that
kind writes; anything else in the way is refused in one line naming the path, before any work. Folders of these
kinds never nest in one another: a corpus replaced whole would take a run inside it along, an export written
into a run folder would overwrite its config.json. Plain functions returning the reason as text (None: no
problem), so each command raises it as its own error with its own flag.
"""

import json
import re
from pathlib import Path

MARKERS = {"arm": "bench_arm.json", "export": "emo_export.json"}  # run and corpus: their own config / meta
MADE_BY = {"run": "train.py", "arm": "bench.py", "corpus": "data/prepare.py", "export": "eval.py --export"}
KIND_WORDS = {"run": "train.py run folder", "arm": "bench.py run folder", "corpus": "corpus folder (data/prepare.py)",
              "export": "Hugging Face export folder (eval.py --export)"}

RUN_FILE = re.compile(r"config\.json|metrics\.jsonl|loss\.png|(latest|stage\d+|step\d+)\.pt|shards")  # what a run writes
TEMP_NAME = re.compile(r"(latest|stage\d+|step\d+)\.pt\.tmp\.\d+|(config\.json|metrics\.jsonl)\.tmp\.\d+")
ARM_FILES = {".lock", MARKERS["arm"], "command.json", "train.log"}  # bench.py's own, beside the run's
CORPUS_FILES = {"meta.json", "train.bin", "train_docs.npy", "val.bin", "val_docs.npy"}


def read_json(path):
    """A JSON object from path, or None where there is none (missing, unreadable, not an object)."""
    try:
        value = json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return None
    return value if isinstance(value, dict) else None


def kind_of(folder):
    """Which command made folder ('run', 'arm', 'corpus', 'export'), by the proof it holds; None: none of them."""
    folder = Path(folder)
    if not folder.is_dir():
        return None
    if (folder / MARKERS["export"]).is_file():
        return "export"
    if (folder / MARKERS["arm"]).is_file() or (folder / "command.json").is_file() and (folder / "train.log").is_file():
        return "arm"  # command.json + train.log: an arm bench.py finished before it wrote bench_arm.json
    if isinstance((read_json(folder / "config.json") or {}).get("run"), str):
        return "run"
    meta = read_json(folder / "meta.json") or {}
    if "splits" in meta and "domains" in meta:
        return "corpus"
    return None


def nesting_problem(folder, kinds):
    """Why folder cannot become a folder of one of `kinds` (the command's own, e.g. {'run', 'arm'} for train.py):
    it is a file or a folder of another kind, lies inside any emo folder, or holds one. None if it can."""
    folder = Path(folder)
    if folder.is_symlink() and not folder.exists():
        return f"is a symbolic link to {folder.readlink()}, which does not exist"
    if folder.exists() and not folder.is_dir():
        return "is a file, not a folder"
    above = next(p for p in folder.absolute().parents if p.exists())
    if not above.is_dir():
        return f"cannot be made: {above} is a file"
    own = kind_of(folder)
    if own and own not in kinds:
        return f"is a {KIND_WORDS[own]}, not {' or '.join(sorted(MADE_BY[k] for k in kinds))}'s"
    for parent in folder.resolve().parents:
        found = kind_of(parent)
        if found:
            return f"lies inside the {KIND_WORDS[found]} {parent}: emo's folders never nest"
    if folder.is_dir():
        for child in sorted(folder.iterdir()):
            found = kind_of(child) if child.is_dir() else None
            if found:
                return f"holds the {KIND_WORDS[found]} {child}: emo's folders never nest"
    return None


def foreign_files(folder, kind):
    """What in folder its command did not write, for a folder about to be replaced or cleared: the names (sorted)
    that are not the kind's own files, or every name where the folder lacks the kind's proof. [] for a missing
    or empty folder, or one that holds only what the command wrote."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    names = sorted(p.name for p in folder.iterdir())
    if not names:
        return []
    if kind_of(folder) != kind:
        return names
    if kind in ("run", "arm"):
        own = ARM_FILES if kind == "arm" else {".lock"}
        return [n for n in names if not (RUN_FILE.fullmatch(n) or TEMP_NAME.fullmatch(n) or n in own)
                or (folder / n).is_dir()]
    if kind == "corpus":
        return [n for n in names if n not in CORPUS_FILES or (folder / n).is_dir()]
    written = set((read_json(folder / MARKERS["export"]) or {}).get("files") or []) | {MARKERS["export"]}
    return [n for n in names if n not in written or (folder / n).is_dir()]


def replace_problem(folder, kind):
    """Why a command of `kind` may not replace or clear folder (None: it may), as a clause that follows the
    folder's name: a file or a folder of another kind in the way, nesting, or files the command did not write
    (the first few named)."""
    why = nesting_problem(folder, {kind})
    if why:
        return why
    foreign = foreign_files(folder, kind)
    if foreign:
        shown = ", ".join(foreign[:3]) + (f" and {len(foreign) - 3} more" if len(foreign) > 3 else "")
        return f"holds {shown}, which {MADE_BY[kind]} did not write there"
    return None


def clear(folder):
    """Delete a folder that replace_problem has cleared: only its files, then the folder (never a subfolder)."""
    folder = Path(folder)
    if not folder.is_dir():
        return
    for path in folder.iterdir():
        path.unlink()
    folder.rmdir()

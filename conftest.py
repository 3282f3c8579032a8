"""Fixtures and helpers shared by emo's test files: small corpora, prepared by data/corpus.py as a user's would be;
the test model; a tiny train.py run and the checks every command's refusals meet. Test files import the helpers
(from conftest import tiny_run): pytest puts this folder on sys.path first."""

import random
import re
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

import emo
import runs
import train
from data.corpus import prepare


POEMS_AND_CODE = {
    "poems": ["Roses are red,\nviolets are blue.", "The fog comes\non little cat feet.", "Ode to a café: naïve?",
              "Tyger Tyger, burning bright", "Shall I compare thee", "I wandered lonely as a cloud"],
    "code": ["def f(x):\n    return x + 1\n", "for i in range(3):\n\tprint(i)", "x = {'a': [1, 2]}",
             "class A:\n    pass", "import os\nprint(os.sep)", "while True:\n    break"]}


@pytest.fixture
def two_domain_texts():
    """Six short documents in each of two domains, including non-ASCII text."""
    return POEMS_AND_CODE


@pytest.fixture
def two_domain_corpus(tmp_path, two_domain_texts):
    """two_domain_texts as .txt files in domain folders, prepared with a third of each domain in val."""
    for domain, texts in two_domain_texts.items():
        (tmp_path / "src" / domain).mkdir(parents=True)
        for i, text in enumerate(texts):
            (tmp_path / "src" / domain / f"{i}.txt").write_text(text)
    return prepare(str(tmp_path / "src"), "tiny", val_fraction=0.34, out_root=tmp_path / "out")


@pytest.fixture(scope="session")
def corpus(tmp_path_factory):
    """A small two-domain corpus of random words, prepared once for the training tests."""
    root = tmp_path_factory.mktemp("corpus")
    rng = random.Random(0)
    words = {"prose": "the cat sat on a mat while rain fell over quiet hills".split(),
             "code": "def return for in range if else import print x y".split()}
    for domain, vocab in words.items():
        (root / "src" / domain).mkdir(parents=True)
        for i in range(20):
            (root / "src" / domain / f"{i}.txt").write_text(" ".join(rng.choice(vocab) for _ in range(150)))
    return prepare(str(root / "src"), "small", out_root=root / "out", val_fraction=0.2)


def tiny(**overrides):
    """The test model: d_model 64, 2 layers, 8 experts; overrides change any Config field."""
    settings = dict(vocab_size=128, seq_len=32, n_layer=2, n_head=4, d_model=64, n_experts=8, top_k=2, d_expert=32)
    settings.update(overrides)
    return emo.Config(**settings)


def seeded_model(seed=0, **overrides):
    torch.manual_seed(seed)
    return emo.Transformer(tiny(**overrides))


PAPER_TOKENS = 1_920_000_000_000


def tiny_run(corpus, out_dir, *extra):
    """Flags of a tiny run: 2 stages (E = 2 -> 4), 24 steps of 256 tokens."""
    return [f"--data={corpus}", f"--out_dir={out_dir}", "--total_tokens=6144", "--seq_len=32",
            "--batch_size=8", "--n_layer=2", "--d_model=64", "--n_head=4", "--d_expert=32",
            "--warmup_steps=3", "--rewarm_steps=3", "--eval_interval=100", "--eval_batches=2", "--log_interval=100",
            "--sample_tokens=0", "--stages=2:0.5,4:0.5", "--lr=3e-3", *extra]


def stopped(args):
    """Run train.py's main on args that stop early: it exits with EXIT_STOPPED, not 0."""
    with pytest.raises(SystemExit) as exit_:
        train.main(args)
    assert exit_.value.code == train.EXIT_STOPPED


def records(out_dir, kind):
    return [r for r in runs.read_metrics(out_dir) if r["kind"] == kind]


def train_process(args):
    return subprocess.Popen([sys.executable, "train.py", *args], cwd=Path(__file__).parent,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def wait_for_steps(out_dir, n, timeout=60):
    start = time.time()
    while time.time() - start < timeout:
        path = Path(out_dir) / "metrics.jsonl"
        if path.exists() and sum('"kind": "step"' in line for line in path.read_text().splitlines()) >= n:
            return
        time.sleep(0.05)
    raise TimeoutError


def assert_one_line(err, match):
    """A refusal is one line that names what was wrong (SystemExit's text, or an exception's)."""
    text = str(err.value.code if isinstance(err.value, SystemExit) else err.value)
    assert re.search(match, text), f"{match!r} not in {text!r}"
    assert "\n" not in text and "Traceback" not in text


def damage(folder, how):
    """Copy-free damage to a prepared corpus folder, one way per name."""
    docs = np.load(folder / "train_docs.npy")
    tokens = np.fromfile(folder / "train.bin", dtype=np.uint16)
    if how == "one column":
        np.save(folder / "train_docs.npy", docs[:, :1])
    elif how == "starts not rising":
        docs[2, 0] = docs[1, 0]
        np.save(folder / "train_docs.npy", docs)
    elif how == "unknown domain":
        docs[0, 1] = 7
        np.save(folder / "train_docs.npy", docs)
    elif how == "token id past the vocabulary":
        tokens[3] = 60000
        tokens.tofile(folder / "train.bin")
    elif how == "document without its end":
        tokens[docs[1, 0] - 1] = 11
        tokens.tofile(folder / "train.bin")
    elif how == "meta not json":
        (folder / "meta.json").write_text("{not json")
    elif how == "docs not an array":
        (folder / "train_docs.npy").write_bytes(b"garbage")


def write_checkpoint(path, change):
    """A checkpoint edited by `change(state)` and saved again."""
    state = torch.load(path, weights_only=True)
    change(state)
    torch.save(state, path.parent / "edited.pt")
    return path.parent / "edited.pt"


def a_users_run(corpus, folder):
    """A user's own stopped train.py run in folder, with their notes beside it."""
    stopped(tiny_run(corpus, folder, "--stop_at=2"))
    (folder / "notes.txt").write_text("my notes")
    return {p.name: p.read_bytes() for p in folder.iterdir() if p.is_file()}

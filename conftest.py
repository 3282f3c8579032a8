"""Fixtures shared by emo's tests: small corpora, prepared by data/corpus.py as a user's would be."""

import random

import pytest

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

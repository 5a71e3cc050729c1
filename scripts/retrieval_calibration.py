"""Calibration windows for a retrieval-aware greedy search: held-out book text with synthetic retrieval
episodes spliced in (the trainer's held-out split and generator), written as a [num, seq_len] token-id .npy
that ``indexcache search --data`` reads row by row.

    python scripts/retrieval_calibration.py models/dsa-mini .data/gutenberg calib.npy --num 4 --seq-len 1024
"""

from __future__ import annotations

import argparse

import numpy as np
from tokenizers import Tokenizer

from indexcache.train.data import split_documents, tokenize
from indexcache.train.retrieval import retrieval_batch


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("model", help="model directory (its tokenizer.json is used)")
    p.add_argument("data", help="directory of books; the trainer's held-out books are used")
    p.add_argument("out", help=".npy file to write")
    p.add_argument("--num", type=int, default=4)
    p.add_argument("--seq-len", type=int, default=1024)
    p.add_argument("--heldout", type=int, default=3)
    p.add_argument("--density", type=float, default=0.5, help="structured share of each window")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    tok = Tokenizer.from_file(f"{args.model}/tokenizer.json")
    _, test, names = split_documents(args.data, args.heldout, args.seed)
    stream = tokenize(test, tok)
    # salt 5: neither the training batches (salt 1) nor the trainer's held-out answer windows (2, 3)
    ids, mask = retrieval_batch(stream, tok, args.num, args.seq_len, args.seed, 0, salt=5, density=args.density)
    np.save(args.out, ids.astype(np.int32))
    print(f"wrote {args.out}: {ids.shape[0]} x {ids.shape[1]} tokens from {', '.join(names)}; "
          f"{mask.mean():.1%} of them answer tokens")


if __name__ == "__main__":
    main()

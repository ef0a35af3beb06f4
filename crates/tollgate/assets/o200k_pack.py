#!/usr/bin/env python3
"""Packs OpenAI's o200k_base vocabulary (tiktoken's `o200k_base.tiktoken`: a base64 token and
its rank per line) into `o200k_base.bin`: for each rank from 0 up, one length byte then the
token's bytes. The estimator (src/estimate/bpe.rs) indexes that blob in place.

    python3 o200k_pack.py path/to/o200k_base.tiktoken > o200k_base.bin

The tiktoken file ships with the tiktoken-rs crate (assets/), MIT licensed like tiktoken.
"""
import base64
import sys

tokens = {}
for line in open(sys.argv[1], "rb"):
    raw, rank = line.split()
    tokens[int(rank)] = base64.b64decode(raw)
out = sys.stdout.buffer
for rank in range(len(tokens)):
    tok = tokens[rank]  # ranks are dense: a gap is a KeyError, not a silent shift
    assert 0 < len(tok) < 256, rank
    out.write(bytes([len(tok)]))
    out.write(tok)

"""What ``max_length`` keeps of each domain's training rows: today's cut (the prompt body's start
first, so the response stays whole) against the plain right cut it replaced (the end of the row,
so a long prompt left its row with no response token, and the row was dropped).

    python benchmarks/bench_truncation.py --data runs/demo/data --max-length 128 256 \
        --out docs/results/truncation.json

The right cut is ``encode_example`` with the whole prompt as the kept head, so both columns come
from the same code. Per domain and max_length: rows, rows dropped, scored (response) tokens and
all tokens, and the ratio of scored tokens (today / right cut).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
from pathlib import Path


def measure(rows: list[dict], tokenizer, max_length: int) -> dict:
    from modula_ray.data.formatting import IGNORE_INDEX, encode_example, prompt_ids, shared_head_length

    head = shared_head_length(tokenizer)
    result = {}
    for policy in ("prompt_start_first", "right_cut"):
        kept = dropped = scored = tokens = 0
        for row in rows:
            keep = len(prompt_ids(tokenizer, row["prompt"])) if policy == "right_cut" else head
            example = encode_example(tokenizer, row["prompt"], row["response"], max_length, head_length=keep)
            n = sum(label != IGNORE_INDEX for label in example.labels[1:])
            if n == 0:
                dropped += 1
                continue
            kept, scored, tokens = kept + 1, scored + n, tokens + len(example.input_ids)
        result[policy] = {"rows": len(rows), "kept": kept, "dropped": dropped, "scored_tokens": scored,
                          "tokens": tokens}
    result["scored_ratio"] = round(result["prompt_start_first"]["scored_tokens"] /
                                   max(1, result["right_cut"]["scored_tokens"]), 3)
    return result


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, required=True, help="a data folder (modula-ray data build)")
    parser.add_argument("--base", default="smollm2-135m", help="whose tokenizer and chat template (default %(default)s)")
    parser.add_argument("--max-length", type=int, nargs="+", default=[128, 256])
    parser.add_argument("--split", default="train")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)
    import pyarrow.parquet as pq

    from modula_ray.data.build import split_file
    from modula_ray.fileio import emit_json
    from transformers import AutoTokenizer

    from modula_ray.models import resolve_base

    tokenizer = AutoTokenizer.from_pretrained(resolve_base(args.base))
    manifest = json.loads((args.data / "datasets.json").read_text())
    domains = {}
    for domain in sorted(manifest["domains"]):
        rows = pq.read_table(split_file(args.data, domain, args.split)).to_pylist()
        domains[domain] = {str(n): measure(rows, tokenizer, n) for n in args.max_length}
        print(f"{domain}: " + ", ".join(f"{n}: x{domains[domain][str(n)]['scored_ratio']}" for n in args.max_length),
              file=sys.stderr, flush=True)
    result = {"machine": {"cpu_count": os.cpu_count(), "platform": platform.platform()},
              "settings": {"data": str(args.data), "base": args.base, "split": args.split,
                           "max_length": args.max_length, "size": manifest.get("size")},
              "domains": domains}
    return emit_json(result, args.out)


if __name__ == "__main__":
    sys.exit(main())

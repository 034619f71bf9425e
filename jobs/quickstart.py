"""Three MoDULA stages in one process, on a handful of examples (no Ray).

    python jobs/quickstart.py [--base smollm2-135m] [--method modula_res] [--steps 4]

Stage 1 trains the universal expert, stage 2 one expert per domain over the frozen
universal, stage 3 stacks them and trains only the router; it prints the loss per stage
and the mean routing weights.
"""
from __future__ import annotations

import argparse
import os
import tempfile
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

import torch  # noqa: E402

from modula_ray.data.formatting import collate, encode_example  # noqa: E402
from modula_ray.experts import inject, load_part, routing_weights, save_part, set_stage  # noqa: E402
from modula_ray.experts import trainable_parameters  # noqa: E402
from modula_ray.models import load_base  # noqa: E402
from modula_ray.objective import causal_lm_loss  # noqa: E402

EXAMPLES = {
    "general": [("Name a primary colour.", "Red."), ("What is the opposite of hot?", "Cold."),
                ("Spell 'cat' backwards.", "tac"), ("How many days are in a week?", "Seven.")],
    "math": [("What is 17 + 25?", "42"), ("Simplify 6/8.", "3/4"), ("What is 9 * 7?", "63"),
             ("What is 100 - 37?", "63")],
    "ecommerce": [("Which aisle sells 'Organic Baby Spinach'?", "packaged vegetables fruits"),
                  ("Which department sells 'Sparkling Water Grapefruit'?", "beverages"),
                  ("Which aisle sells 'Chocolate Sandwich Cookies'?", "cookies cakes"),
                  ("Which department sells 'Whole Milk'?", "dairy eggs")],
}


def train(model, tokenizer, pairs, stage: str, steps: int, lr: float, aux: float = 0.0) -> float:
    set_stage(model, stage)
    params = list(trainable_parameters(model).values())
    optimizer = torch.optim.AdamW(params, lr=lr)
    batch = collate([encode_example(tokenizer, p, r, 256) for p, r in pairs], tokenizer.pad_token_id)
    model.train()
    started, loss = time.perf_counter(), None
    for step in range(1, steps + 1):
        loss, stats = causal_lm_loss(model, batch, aux)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        rate = stats["input_tokens"] * step / (time.perf_counter() - started)
        print(f"  [{stage}] step {step}/{steps} loss {stats['ce']:.4f} aux {stats['aux']:.3f} "
              f"({rate:.0f} tok/s, {sum(p.numel() for p in params):,} trainable)")
    return float(stats["ce"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--base", default="smollm2-135m")
    parser.add_argument("--method", default="modula_res", choices=["modula_res", "modula_flan"])
    parser.add_argument("--steps", type=int, default=4)
    args = parser.parse_args()
    torch.manual_seed(0)
    domains = ["math", "ecommerce"]
    with tempfile.TemporaryDirectory() as run:
        model, tokenizer = load_base(args.base)
        inject(model, args.method, ["placeholder"])
        print("stage 1: universal expert on the general mix")
        train(model, tokenizer, EXAMPLES["general"], "universal", args.steps, 1e-3)
        save_part(model, "universal", f"{run}/universal")
        for domain in domains:
            print(f"stage 2: {domain} expert over the frozen universal")
            model, tokenizer = load_base(args.base)
            inject(model, args.method, [domain])
            load_part(model, "universal", f"{run}/universal")
            train(model, tokenizer, EXAMPLES[domain], "experts", args.steps, 1e-3)
            save_part(model, "domain", f"{run}/experts/{domain}", domain=domain)
        print("stage 3: router over the stacked experts")
        model, tokenizer = load_base(args.base)
        inject(model, args.method, domains)
        load_part(model, "universal", f"{run}/universal")
        for domain in domains:
            load_part(model, "domain", f"{run}/experts/{domain}", domain=domain)
        mixed = [pair for name in domains for pair in EXAMPLES[name]]
        train(model, tokenizer, mixed, "router", args.steps, 1e-2, aux=0.01)
        weights = routing_weights(model)
        print("mean routing weights: " + ", ".join(f"{k}={v:.3f}" for k, v in weights.items()))


if __name__ == "__main__":
    main()

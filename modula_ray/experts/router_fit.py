"""Fit the routers to the rows' domains before a router stage's first step (``route_init_rows``).

The supervised routing term (``route_loss_coef``) is, router by router, a multinomial logistic
regression of a token's row domain on the router's own input ``x``. The experts move a layer's
output by about 1 % (docs/RESULTS.md), so the inputs hardly depend on the routers and the
regression can be solved up front, on inputs captured once, by full-batch L-BFGS:

    W_r = argmin_W  mean_t CE((W x_t + b) / tau, label_t) + L2 * mean_t(|x_t|)^2 * |W|^2

over ``TOKENS_PER_ROW`` labelled tokens (prompt body and response: ``route_labels``) of
``route_init_rows`` training rows per routed domain, from the routers' current weights.
``rows_to_fit`` takes a domain's rows from each kind of row in turn (its generator, task or
subject: ``row_kind``), so a domain made of several generators is fitted on all of them: code's
first 12 rows by id are all ``bf``, and fitted on 8 of them, its ``codeio`` rows went to the math
expert (docs/RESULTS.md). The router stage then trains as configured (with or without
``route_loss_coef``). Each rank fits on its own rows; DDP and DeepSpeed broadcast rank 0's
weights when they wrap the model. Measured in docs/RESULTS.md.
"""
from __future__ import annotations

import time
from contextlib import contextmanager

import torch
import torch.nn.functional as F

from ..data.formatting import IGNORE_INDEX, collate
from ..data.schema import row_kind
from .inject import expert_layers, routers

TOKENS_PER_ROW = 32   # labelled tokens drawn from each row (its later tokens add little)
CAPTURE_BATCH = 8     # rows per capture forward
L2 = 1e-4             # relative to the mean input norm squared: keeps the gates soft enough to mix
MAX_ITER = 50         # L-BFGS iterations per router (it converges in 20-40 here)


@contextmanager
def router_inputs(model: torch.nn.Module):
    """``{router path: its input of the last forward}``. A router that the model calls itself
    (block placement, MoDE's gates, dropout on) is hooked directly; a layer's router whose weight
    the layer reads in its own matmul (``LinearExperts``) through the layer's input. Clear the
    dict before each forward."""
    found: dict[str, torch.Tensor] = {}
    by_id = {id(router): path for path, router in routers(model).items()}
    hooks = [router.register_forward_pre_hook(lambda module, args, path=path: found.__setitem__(path, args[0]))
             for path, router in routers(model).items()]
    for layer in expert_layers(model).values():
        path = by_id.get(id(getattr(layer, "router", None)))
        if path is not None:  # runs first; the router's own hook (if it is called) overwrites it
            hooks.append(layer.register_forward_pre_hook(lambda module, args, path=path: found.setdefault(path, args[0])))
    try:
        yield found
    finally:
        for hook in hooks:
            hook.remove()


def rows_to_fit(rows: list[dict], per_domain: int, domains) -> list[dict]:
    """Up to ``per_domain`` rows of each of ``domains``: the first row of every kind, then the
    second of every kind, and so on (kinds in their order in ``rows``, rows in theirs)."""
    picked = []
    for domain in domains:
        kinds: dict[str, list[dict]] = {}
        for row in rows:
            if row["domain"] == domain:
                kinds.setdefault(row_kind(row), []).append(row)
        in_turn = []
        for depth in range(max(map(len, kinds.values()), default=0)):
            in_turn += [queue[depth] for queue in kinds.values() if depth < len(queue)]
        picked += in_turn[:per_domain]
    return picked


def capture(model, examples: list, seed: int) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """Each router's inputs at ``TOKENS_PER_ROW`` labelled positions per example (forwards of
    ``CAPTURE_BATCH`` right-padded rows, no gradient, eval mode) and their labels:
    ``({path: [n, d_in]}, [n])``. Routers that read the same input (q, k and v's) share one tensor."""
    generator, device = torch.Generator().manual_seed(seed), next(model.parameters()).device
    features: dict[str, list[torch.Tensor]] = {}
    labels = []
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad(), router_inputs(model) as found:
            for first in range(0, len(examples), CAPTURE_BATCH):
                batch = collate(examples[first:first + CAPTURE_BATCH], pad_id=0)
                found.clear()
                model(input_ids=batch["input_ids"].to(device), attention_mask=batch["attention_mask"].to(device),
                      use_cache=False, logits_to_keep=1)
                positions = []
                for row, route in enumerate(batch["route_labels"]):
                    mine = (route != IGNORE_INDEX).nonzero().flatten()
                    positions.append(row * route.shape[0] + mine[torch.randperm(len(mine), generator=generator)[:TOKENS_PER_ROW]])
                positions = torch.cat(positions)
                labels.append(batch["route_labels"].flatten()[positions])
                picked: dict[int, torch.Tensor] = {}  # one copy per distinct input tensor
                for path, x in found.items():
                    if id(x) not in picked:
                        picked[id(x)] = x.reshape(-1, x.shape[-1])[positions.to(x.device)].float().cpu()
                    features.setdefault(path, []).append(picked[id(x)])
    finally:
        model.train(was_training)
    shared: dict[tuple, torch.Tensor] = {}  # q, k and v's inputs concatenated once
    for parts in features.values():
        key = tuple(id(p) for p in parts)
        if key not in shared:
            shared[key] = torch.cat(parts)
    return {path: shared[tuple(id(p) for p in parts)] for path, parts in features.items()}, torch.cat(labels)


def fit_router(router, x: torch.Tensor, y: torch.Tensor) -> tuple[float, float]:
    """Solve the regression above for one router in place; ``(loss before, loss after)`` (CE only)."""
    weight = router.weight.detach().float().cpu().clone().requires_grad_(True)
    bias = None if router.bias is None else router.bias.detach().float().cpu().clone().requires_grad_(True)
    params = [weight] + ([bias] if bias is not None else [])
    penalty = L2 * float(x.norm(dim=-1).mean()) ** 2

    def ce() -> torch.Tensor:
        logits = x @ weight.T + (bias if bias is not None else 0)
        return F.cross_entropy(logits / router.temperature, y)

    with torch.no_grad():
        before = float(ce())
    optimizer = torch.optim.LBFGS(params, lr=1, max_iter=MAX_ITER, line_search_fn="strong_wolfe")

    def closure():
        optimizer.zero_grad()
        loss = ce() + penalty * weight.pow(2).sum()
        loss.backward()
        return loss

    optimizer.step(closure)
    with torch.no_grad():
        router.weight.copy_(weight.to(router.weight))
        if bias is not None:
            router.bias.copy_(bias.to(router.bias))
        return before, float(ce())


def _digest(router) -> bytes:
    """The router's current weights and bias, as bytes (routers that start alike fit alike)."""
    state = [router.weight] + ([router.bias] if router.bias is not None else [])
    return b"".join(t.detach().float().cpu().numpy().tobytes() for t in state)


def describe(fit: dict) -> str:
    return (f"routers fitted to {fit['rows']} rows' domains ({fit['tokens']} tokens) in {fit['seconds']:.1f} s: "
            f"route nll {fit['route_nll_before']:.3f} -> {fit['route_nll_after']:.3f}")


def fit_routers(model, examples: list, seed: int) -> dict:
    """Fit every router of ``model`` on ``examples`` (``rows_to_fit``'s rows, encoded with their
    route labels; module docstring). Returns what the ledger keeps: rows, tokens fitted on, input
    tokens (forwards), seconds, and the mean route nll over the routers before and after (on those tokens)."""
    started, paths = time.perf_counter(), routers(model)
    if not paths:
        raise ValueError("route_init_rows is set for a stage that trains no router")
    picked = [e for e in examples if any(t != IGNORE_INDEX for t in e.route_labels or [])]
    if not picked:
        raise ValueError("route_init_rows is set but no training row has a routing label "
                         "(the stage's data domains have no expert of their own)")
    features, labels = capture(model, picked, seed)
    missing = sorted(set(paths) - set(features))
    if missing:
        raise RuntimeError(f"route_init_rows: no input was seen for the routers {missing[:3]}")
    losses, solved = [], {}
    for path, router in paths.items():  # q, k and v's routers: one input, one start, one solution
        key = (id(features[path]), router.temperature, tuple(router.weight.shape), _digest(router))
        if key in solved:
            source, loss = solved[key]
            with torch.no_grad():
                router.weight.copy_(source.weight)
                if router.bias is not None:
                    router.bias.copy_(source.bias)
        else:
            loss = fit_router(router, features[path], labels)
            solved[key] = router, loss
        losses.append(loss)
    return {"rows": len(picked), "tokens": len(labels), "input_tokens": sum(len(e.input_ids) for e in picked),
            "seconds": round(time.perf_counter() - started, 2),
            "route_nll_before": sum(b for b, _ in losses) / len(losses),
            "route_nll_after": sum(a for _, a in losses) / len(losses)}

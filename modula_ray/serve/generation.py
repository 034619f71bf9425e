"""Batched generation over a composed model: requests from different domains in one forward pass.

``generate_batch(model, tokenizer, requests)`` decodes every request together:

- prompts are **left-padded** to one length; ``position_ids`` count real tokens only, so a row's
  positions (and so its logits) do not depend on the others' lengths;
- one prefill forward, then one decode forward per step over the **KV cache**;
- each request stops on its own: ``max_tokens`` (``finish_reason="length"``), EOS or one of its
  ``stop`` strings (``"stop"``; the text is cut before the stop string). A finished row keeps
  decoding padding until the batch is done, but nothing of it is returned;
- sampling per request: ``temperature`` 0 is greedy; otherwise softmax(logits / temperature), cut
  to the smallest set whose mass reaches ``top_p``, drawn with the request's own ``seed`` (a
  ``torch.Generator`` per row, so a request draws the same tokens whatever it is batched with);
- with ``routing=True``, the mean gate per routed expert over the positions that produced the
  generated tokens (averaged over every router), from ``Router.last_gates``.

The router mixes every expert for every token of every row: the token-level mixture is the
model's own forward, not a per-request adapter choice.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass
class GenerationRequest:
    prompt_ids: list[int]
    max_tokens: int = 16
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int | None = None
    stop: list[str] = field(default_factory=list)
    routing: bool = False

    def __post_init__(self):
        if not self.prompt_ids:
            raise ValueError("prompt_ids: empty prompt")
        if self.max_tokens < 1:
            raise ValueError(f"max_tokens must be >= 1, got {self.max_tokens}")
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")


@dataclass
class GenerationResult:
    token_ids: list[int]
    text: str
    finish_reason: str                       # stop | length
    prompt_tokens: int
    completion_tokens: int
    routing: dict[str, float] | None = None


def _left_pad(requests: list[GenerationRequest], pad_id: int, device) -> tuple[torch.Tensor, ...]:
    width = max(len(r.prompt_ids) for r in requests)
    ids = torch.full((len(requests), width), pad_id, dtype=torch.long, device=device)
    mask = torch.zeros((len(requests), width), dtype=torch.long, device=device)
    for row, request in enumerate(requests):
        ids[row, width - len(request.prompt_ids):] = torch.tensor(request.prompt_ids, device=device)
        mask[row, width - len(request.prompt_ids):] = 1
    positions = (mask.cumsum(dim=1) - 1).clamp(min=0)
    return ids, mask, positions


def _pick(logits: torch.Tensor, request: GenerationRequest, generator: torch.Generator | None) -> int:
    """The next token of one row from its last logits ``[vocab]``."""
    if request.temperature == 0:
        return int(logits.argmax())
    probs = torch.softmax(logits.float() / request.temperature, dim=-1)
    if request.top_p < 1:
        sorted_probs, order = probs.sort(descending=True)
        keep = sorted_probs.cumsum(dim=-1) - sorted_probs < request.top_p  # always keeps the first
        probs = torch.zeros_like(probs).scatter_(0, order[keep], sorted_probs[keep])
    return int(torch.multinomial(probs / probs.sum(), 1, generator=generator))


def _cut_at_stop(text: str, stops: list[str]) -> tuple[str, bool]:
    hits = [text.find(s) for s in stops if s and s in text]
    return (text[:min(hits)], True) if hits else (text, False)


@torch.no_grad()
def generate_batch(model, tokenizer, requests: list[GenerationRequest]) -> list[GenerationResult]:
    """Decode ``requests`` together (see the module docstring); results in request order."""
    from ..experts import last_position_gates, spec_of

    if not requests:
        return []
    device = next(model.parameters()).device
    configured = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    eos = {tokenizer.eos_token_id} | set(configured if isinstance(configured, (list, tuple)) else [configured])
    eos.discard(None)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else next(iter(eos))
    ids, mask, positions = _left_pad(requests, pad_id, device)
    generators = [torch.Generator().manual_seed(r.seed) if r.seed is not None else None for r in requests]
    routed = spec_of(model).routed_names() if getattr(model, "modula_spec", None) is not None else []
    out = model(input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=True)
    tokens = [[] for _ in requests]
    texts, reasons = [""] * len(requests), [None] * len(requests)
    gate_sums, gate_steps = [torch.zeros(len(routed)) for _ in requests], [0] * len(requests)
    for step in range(max(r.max_tokens for r in requests)):
        gates = last_position_gates(model)
        next_ids = torch.full((len(requests),), pad_id, dtype=torch.long, device=device)
        for row, request in enumerate(requests):
            if reasons[row] is not None:
                continue
            if gates is not None:
                gate_sums[row] += gates[row].cpu()
                gate_steps[row] += 1
            token = _pick(out.logits[row, -1], request, generators[row])
            next_ids[row] = token
            if token in eos:
                reasons[row] = "stop"
                continue
            tokens[row].append(token)
            texts[row], stopped = _cut_at_stop(tokenizer.decode(tokens[row], skip_special_tokens=True),
                                               request.stop)
            if stopped:
                reasons[row] = "stop"
            elif len(tokens[row]) >= request.max_tokens:
                reasons[row] = "length"
        if all(reason is not None for reason in reasons):
            break
        mask = torch.cat([mask, torch.ones((len(requests), 1), dtype=mask.dtype, device=device)], dim=1)
        positions = positions[:, -1:] + 1
        out = model(input_ids=next_ids[:, None], attention_mask=mask, position_ids=positions,
                    past_key_values=out.past_key_values, use_cache=True)
    results = []
    for row, request in enumerate(requests):
        routing = None
        if request.routing and gate_steps[row]:
            routing = {name: round(float(value) / gate_steps[row], 6) for name, value in zip(routed, gate_sums[row])}
        results.append(GenerationResult(token_ids=tokens[row], text=texts[row], finish_reason=reasons[row],
                                        prompt_tokens=len(request.prompt_ids),
                                        completion_tokens=len(tokens[row]), routing=routing))
    return results

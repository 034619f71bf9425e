"""Batched generation over a composed model: requests from different domains in one forward pass.

``BatchDecoder(model, tokenizer, requests)`` decodes every request together, one ``step()`` per
token, so a caller can stream; ``generate_batch`` runs it to the end.

- prompts are **left-padded** to one length; ``position_ids`` count real tokens only, so a row's
  positions (and so its logits) do not depend on the others' lengths;
- one prefill forward, then one decode forward per step over the **KV cache**;
- each request stops on its own: ``max_tokens`` (``finish_reason="length"``), EOS or one of its
  ``stop`` strings (``"stop"``; the text is cut before the stop string), or ``cancel()`` (the
  client left: the row stops decoding); with ``ignore_eos`` an EOS is an ordinary (textless)
  token. A finished row feeds padding until the batch is done;
- sampling per request: ``temperature`` 0 is greedy; otherwise softmax(logits / temperature), cut
  to the smallest set whose mass reaches ``top_p``, drawn with the request's own ``seed`` (a
  ``torch.Generator`` per row, so a request draws the same tokens whatever it is batched with);
- streamed text holds back a tail that could still become a stop string or an unfinished UTF-8
  character, so nothing sent is ever taken back;
- ``logprobs=k``: log p(token) under the model's own distribution (before temperature) and the
  top ``k``; with ``echo`` the prompt's tokens too, from the prefill (the first has none). The
  EOS token that ends a row is scored like any generated token but never appears in the text;
- with ``routing=True``, the mean gate per routed expert over the positions that produced the
  generated tokens (averaged over every router), from ``Router.last_gates``;
- the prefill keeps the logits of the last position only, unless a row echoes its prompt with
  logprobs (then every position's: lm-eval's loglikelihood needs them);
- a failure inside one row (its seed, its sampling, its text) ends that row alone with
  ``finish_reason="error"`` and the error; the other rows decode on. A failing forward fails all.

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
    logprobs: int | None = None
    echo: bool = False
    ignore_eos: bool = False                 # vLLM's option: EOS is an ordinary token, only length/stop end
    cancelled: bool = field(default=False, compare=False)

    def __post_init__(self):
        if not self.prompt_ids:
            raise ValueError("prompt_ids: empty prompt")
        if self.max_tokens < 1:
            raise ValueError(f"max_tokens must be >= 1, got {self.max_tokens}")
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")

    def cancel(self) -> None:
        """Stop decoding this row at the next step (its client is gone or timed out)."""
        self.cancelled = True


@dataclass
class TokenLogprob:
    token_id: int
    logprob: float | None                   # None for the first prompt token
    top: dict[int, float] | None = None     # the k most likely token ids at that position


@dataclass
class GenerationResult:
    token_ids: list[int]
    text: str
    finish_reason: str                       # stop | length | cancelled
    prompt_tokens: int
    completion_tokens: int
    routing: dict[str, float] | None = None
    logprobs: list[TokenLogprob] | None = None   # prompt tokens first when echo, then generated
    error: str | None = None                     # finish_reason "error": what failed in this row


@dataclass
class StepEvent:
    """One row's news from one step: new text, and its result on its last event."""
    delta: str
    result: GenerationResult | None = None


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


def _scored(logits: torch.Tensor, token_ids: list[int], k: int) -> list[TokenLogprob]:
    """log p of each ``token_ids[i]`` under ``logits[i]`` (``[n, vocab]``) and the top ``k``."""
    logp = torch.log_softmax(logits.float(), dim=-1)
    chosen = logp.gather(1, torch.tensor(token_ids, device=logits.device)[:, None])[:, 0].tolist()
    top_values, top_ids = logp.topk(max(k, 1), dim=-1)
    return [TokenLogprob(token, value, dict(zip(ids[:k], values[:k])) if k else None)
            for token, value, ids, values in zip(token_ids, chosen, top_ids.tolist(), top_values.tolist())]


def _cut_at_stop(text: str, stops: list[str], start: int = 0) -> tuple[str, bool]:
    """``text`` cut before the first stop string that begins at ``start`` or later (the caller passes
    where new text could first complete one, so each step searches only the tail: linear overall)."""
    hits = [at for s in stops if s and (at := text.find(s, start)) >= 0]
    return (text[:min(hits)], True) if hits else (text, False)


def _held_back(text: str, stops: list[str]) -> int:
    """How many trailing characters might still turn into a stop string or a finished character
    (each stop is at most ``schemas.MAX_STOP_CHARS`` long, so this is bounded per step)."""
    tail = len(text) - len(text.rstrip("\ufffd"))
    for stop in stops:
        tail = max([tail] + [k for k in range(1, min(len(stop), len(text)) + 1) if text.endswith(stop[:k])])
    return tail


class BatchDecoder:
    """Decodes ``requests`` together; ``step()`` returns one ``StepEvent`` (or ``None`` once the
    row has finished) per request, until ``done``."""

    def __init__(self, model, tokenizer, requests: list[GenerationRequest]):
        from ..experts import spec_of

        self.model, self.tokenizer, self.requests = model, tokenizer, requests
        self.device = next(model.parameters()).device
        configured = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
        self.eos = {tokenizer.eos_token_id} | set(configured if isinstance(configured, (list, tuple)) else [configured])
        self.eos.discard(None)
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else next(iter(self.eos))
        self.routed = spec_of(model).routed_names() if getattr(model, "modula_spec", None) is not None else []
        n = len(requests)
        self.tokens, self.texts, self.sent = [[] for _ in range(n)], [""] * n, [0] * n
        self.reasons: list[str | None] = [None] * n
        self.errors: list[str | None] = [None] * n
        self.errors_sent = [False] * n
        self.gate_sums, self.gate_steps = [torch.zeros(len(self.routed)) for _ in range(n)], [0] * n
        self.scores: list[list[TokenLogprob]] = [[] for _ in range(n)]
        self.generators = [self._generator(row, r.seed) for row, r in enumerate(requests)]
        ids, self.mask, self.positions = _left_pad(requests, self.pad_id, self.device)
        echoed = any(r.echo and r.logprobs is not None for r in requests)
        with torch.no_grad():
            self.out = model(input_ids=ids, attention_mask=self.mask, position_ids=self.positions, use_cache=True,
                             logits_to_keep=0 if echoed else 1)
        for row, request in enumerate(requests):
            if request.echo and request.logprobs is not None and self.reasons[row] is None:
                length = len(request.prompt_ids)
                prompt_logits = self.out.logits[row, ids.shape[1] - length:ids.shape[1] - 1]
                self.scores[row] = ([TokenLogprob(request.prompt_ids[0], None)]
                                    + _scored(prompt_logits, request.prompt_ids[1:], request.logprobs))

    def _generator(self, row: int, seed: int | None) -> torch.Generator | None:
        try:
            return torch.Generator().manual_seed(seed) if seed is not None else None
        except (RuntimeError, ValueError, OverflowError) as error:
            self._fail(row, error)
            return None

    def _fail(self, row: int, error: Exception) -> StepEvent:
        """End this row alone; the batch goes on without it."""
        self.reasons[row], self.errors[row] = "error", f"{type(error).__name__}: {error}"
        return StepEvent("", self._result(row))

    @property
    def done(self) -> bool:
        """Every row finished, and every row that failed has had its event."""
        return all(reason is not None for reason in self.reasons) and all(
            sent or reason != "error" for sent, reason in zip(self.errors_sent, self.reasons))

    @torch.no_grad()
    def step(self) -> list[StepEvent | None]:
        """Pick every live row's next token, then run one decode forward if any row goes on."""
        from ..experts import last_position_gates

        gates = last_position_gates(self.model)
        next_ids = torch.full((len(self.requests),), self.pad_id, dtype=torch.long, device=self.device)
        events: list[StepEvent | None] = [None] * len(self.requests)
        for row, request in enumerate(self.requests):
            if self.reasons[row] == "error" and not self.errors_sent[row]:
                self.errors_sent[row], events[row] = True, StepEvent("", self._result(row))
            if self.reasons[row] is not None:
                continue
            if request.cancelled:
                self.reasons[row] = "cancelled"
                events[row] = StepEvent("", self._result(row))
                continue
            if gates is not None:
                self.gate_sums[row] += gates[row].cpu()
                self.gate_steps[row] += 1
            try:
                logits = self.out.logits[row, -1]
                token = _pick(logits, request, self.generators[row])
                if request.logprobs is not None:
                    self.scores[row] += _scored(logits[None], [token], request.logprobs)
                events[row] = self._advance(row, token)
            except Exception as error:  # noqa: BLE001 - one row's failure is that row's alone
                events[row] = self._fail(row, error)
                self.errors_sent[row] = True
                continue
            next_ids[row] = token
        if not self.done:
            self.mask = torch.cat([self.mask, torch.ones((len(self.requests), 1), dtype=self.mask.dtype,
                                                         device=self.device)], dim=1)
            self.positions = self.positions[:, -1:] + 1
            self.out = self.model(input_ids=next_ids[:, None], attention_mask=self.mask, position_ids=self.positions,
                                  past_key_values=self.out.past_key_values, use_cache=True)
        return events

    def _advance(self, row: int, token: int) -> StepEvent:
        request = self.requests[row]
        self.tokens[row].append(token)
        if token in self.eos and not request.ignore_eos:
            self.reasons[row] = "stop"
        else:
            text = self.tokenizer.decode([t for t in self.tokens[row] if t not in self.eos], skip_special_tokens=True)
            # a stop string not found last step can only end in what is new; decoding may redo the last
            # few characters (an unfinished UTF-8 character), hence the margin of 4
            start = max(0, len(self.texts[row]) - max((len(s) for s in request.stop), default=0) - 4)
            self.texts[row], stopped = _cut_at_stop(text, request.stop, start)
            if stopped:
                self.reasons[row] = "stop"
            elif len(self.tokens[row]) >= request.max_tokens:
                self.reasons[row] = "length"
        text = self.texts[row]
        ready = len(text) if self.reasons[row] else len(text) - _held_back(text, request.stop)
        delta, self.sent[row] = text[self.sent[row]:ready], max(self.sent[row], ready)
        return StepEvent(delta, self._result(row) if self.reasons[row] else None)

    def _result(self, row: int) -> GenerationResult:
        request, steps = self.requests[row], self.gate_steps[row]
        routing = None
        if request.routing and steps:
            routing = {name: round(float(value) / steps, 6) for name, value in zip(self.routed, self.gate_sums[row])}
        return GenerationResult(token_ids=self.tokens[row], text=self.texts[row], finish_reason=self.reasons[row],
                                prompt_tokens=len(request.prompt_ids), completion_tokens=len(self.tokens[row]),
                                routing=routing, logprobs=self.scores[row] if request.logprobs is not None else None,
                                error=self.errors[row])


def generate_batch(model, tokenizer, requests: list[GenerationRequest]) -> list[GenerationResult]:
    """Decode ``requests`` together to the end (see the module docstring); results in request order."""
    if not requests:
        return []
    decoder = BatchDecoder(model, tokenizer, requests)
    results: list[GenerationResult | None] = [None] * len(requests)
    while not decoder.done:
        for row, event in enumerate(decoder.step()):
            if event is not None and event.result is not None:
                results[row] = event.result
    return results

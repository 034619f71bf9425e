"""Continuous batching over a composed model: rows join and leave the running batch at every step.

``Decoder(model, tokenizer)`` holds one model's running rows in a KV cache of slots (``slots.py``).
Each ``step(new)``:

1. **prefill** the ``new`` rows (right-padded to one length, in slots after the running rows), and
   pick each one's first token from the logits of its own last prompt position;
2. **pick** every other running row's next token from the last decode's logits;
3. rows that finished **leave** (their slot is reused at once);
4. one **decode** forward over every running row, each at its own position.

So a request waits for no other request to finish, and a finished row costs nothing from the next
step on. ``generate_batch`` runs a fixed set of requests to the end; the Serve replica runs a
``Decoder`` per loaded model and feeds it new rows as they arrive (``engine.py``).

Per row, whatever it is batched with:

- positions count its own tokens, so its logits do not depend on the others' lengths;
- it stops on its own: ``max_tokens`` (``finish_reason="length"``), EOS or one of its ``stop``
  strings (``"stop"``; the text is cut before the stop string), or ``cancel()`` (the client left);
  with ``ignore_eos`` an EOS is an ordinary (textless) token;
- sampling: ``temperature`` 0 is greedy; otherwise softmax(logits / temperature), cut to the
  smallest set whose mass reaches ``top_p``, drawn with the request's own ``seed`` (a
  ``torch.Generator`` per row);
- streamed text holds back a tail that could still become a stop string or an unfinished UTF-8
  character, so nothing sent is ever taken back;
- ``logprobs=k``: log p(token) under the model's own distribution (before temperature) and the
  top ``k``; with ``echo`` the prompt's tokens too, from the prefill (the first has none). The
  EOS token that ends a row is scored like any generated token but never appears in the text;
- with ``routing=True``, the mean gate per routed expert over the positions that produced the
  generated tokens (averaged over every router);
- only the logits that are needed are computed: the vocabulary projection runs on each new row's
  last prompt position (every position for a row that echoes logprobs) and on the decoded tokens;
- a failure inside one row (its seed, its sampling, its text) ends that row alone with
  ``finish_reason="error"``; the other rows decode on. A failing forward fails the decoder's rows.

The router mixes every expert for every token of every row: the token-level mixture is the
model's own forward, not a per-request adapter choice.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from .slots import SlotCache, SlotState


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


class Row:
    """One request's decoding state: its tokens, text, reason, scores and gates."""

    def __init__(self, request: GenerationRequest, decoder: "Decoder", member=None):
        self.request, self.decoder, self.member = request, decoder, member     # member: its model in a bank
        self.routed, self.routers = decoder.routing_of(member)
        self.tokens: list[int] = []
        self.text, self.sent, self.reason, self.error = "", 0, None, None
        self.gate_sum, self.gate_steps = None, 0
        self.scores: list[TokenLogprob] = []
        self.logits: torch.Tensor | None = None          # for the next token
        self.gates: torch.Tensor | None = None           # the router's gates at that position
        try:
            self.generator = torch.Generator().manual_seed(request.seed) if request.seed is not None else None
        except (RuntimeError, ValueError, OverflowError) as error:
            self.fail(error)

    def fail(self, error: Exception) -> StepEvent:
        """End this row alone; the batch goes on without it."""
        self.reason, self.error = "error", f"{type(error).__name__}: {error}"
        return StepEvent("", self.result())

    def take(self) -> StepEvent:
        """Pick the next token from ``logits``; the row's event."""
        request = self.request
        if request.cancelled:
            self.reason = "cancelled"
            return StepEvent("", self.result())
        try:
            if self.gates is not None:
                self.gate_sum = self.gates if self.gate_sum is None else self.gate_sum + self.gates
                self.gate_steps += 1
            token = _pick(self.logits, request, self.generator)
            if request.logprobs is not None:
                self.scores += _scored(self.logits[None], [token], request.logprobs)
            return self._advance(token)
        except Exception as error:  # noqa: BLE001 - one row's failure is that row's alone
            return self.fail(error)

    def _advance(self, token: int) -> StepEvent:
        request, eos = self.request, self.decoder.eos
        self.tokens.append(token)
        if token in eos and not request.ignore_eos:
            self.reason = "stop"
        else:
            text = self.decoder.tokenizer.decode([t for t in self.tokens if t not in eos], skip_special_tokens=True)
            # a stop string not found last step can only end in what is new; decoding may redo the last
            # few characters (an unfinished UTF-8 character), hence the margin of 4
            start = max(0, len(self.text) - max((len(s) for s in request.stop), default=0) - 4)
            self.text, stopped = _cut_at_stop(text, request.stop, start)
            if stopped:
                self.reason = "stop"
            elif len(self.tokens) >= request.max_tokens:
                self.reason = "length"
        ready = len(self.text) if self.reason else len(self.text) - _held_back(self.text, request.stop)
        delta, self.sent = self.text[self.sent:ready], max(self.sent, ready)
        return StepEvent(delta, self.result() if self.reason else None)

    def result(self) -> GenerationResult:
        request, routing = self.request, None
        if request.routing and self.gate_steps:
            routing = {name: round(float(value) / self.gate_steps, 6)
                       for name, value in zip(self.routed, self.gate_sum)}
        return GenerationResult(token_ids=self.tokens, text=self.text, finish_reason=self.reason,
                                prompt_tokens=len(request.prompt_ids), completion_tokens=len(self.tokens),
                                routing=routing, logprobs=self.scores if request.logprobs is not None else None,
                                error=self.error)


class Decoder:
    """One model's running rows (continuous batching, see the module docstring)."""

    def __init__(self, model, tokenizer, slots: int = 8, bank=None):
        """``bank``: a ``bank.Bank`` whose model runs the rows of its members (``step``'s ``members``)."""
        from ..experts import spec_of

        self.bank, self.tokenizer = bank, tokenizer
        self.model = model = bank.model if bank is not None else model
        self.device = next(model.parameters()).device
        configured = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
        self.eos = {tokenizer.eos_token_id} | set(configured if isinstance(configured, (list, tuple)) else [configured])
        self.eos.discard(None)
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else next(iter(self.eos))
        self.routed = spec_of(model).routed_names() if getattr(model, "modula_spec", None) is not None else []
        self.routers = _routers(model)
        self.state = SlotState(slots)
        self.cache = SlotCache(self.state)
        self.rows: list[Row] = []           # running, in slot order
        self.backbone, self.head = model.get_decoder(), model.get_output_embeddings()

    @property
    def running(self) -> int:
        return len(self.rows)

    def routing_of(self, member) -> tuple[list[str], list]:
        """(routed expert names, routers) for a row of ``member`` (None: this decoder's own model)."""
        from ..experts import spec_of

        if member is None or getattr(member, "modula_spec", None) is None:
            return (self.routed, self.routers) if member is None else ([], [])
        return spec_of(member).routed_names(), _routers(member)

    @torch.no_grad()
    def step(self, new: list[GenerationRequest] = (), members: list | None = None
             ) -> list[tuple[GenerationRequest, StepEvent]]:
        """Prefill ``new`` (of ``members``, in a bank), pick a token for every running row, let finished
        rows go, decode once."""
        events = []
        joining = []
        for request, member in zip(new, members or [None] * len(new)):
            row = Row(request, self, member)
            if row.reason is not None:                       # failed before it ran (its seed)
                events.append((request, StepEvent("", row.result())))
            else:
                joining.append(row)
        if joining:
            self._prefill(joining)
        for row in list(self.rows):
            events.append((row.request, row.take()))
        for index in reversed(range(len(self.rows))):
            if self.rows[index].reason is not None:
                self._leave(index)
        if self.rows:
            self._decode()
        return events

    def _leave(self, index: int) -> None:
        moved = self.state.leave(index)
        if moved is not None:
            self.rows[index] = self.rows[moved]
        self.rows.pop()

    def _forward(self, rows: list[Row], ids: torch.Tensor, positions: torch.Tensor, mask: torch.Tensor
                 ) -> torch.Tensor:
        if self.bank is not None:
            self.bank.route([row.member for row in rows], ids.shape[1],
                            record=any(row.request.routing and row.routers for row in rows))
        return self.backbone(input_ids=ids, attention_mask=mask, position_ids=positions, past_key_values=self.cache,
                             use_cache=True).last_hidden_state

    def _prefill(self, rows: list[Row]) -> None:
        if self.bank is not None:
            rows = [rows[i] for i in self.bank.group([row.member for row in rows])]
        lengths = [len(row.request.prompt_ids) for row in rows]
        ids = torch.full((len(rows), max(lengths)), self.pad_id, dtype=torch.long, device=self.device)
        for i, row in enumerate(rows):
            ids[i, :lengths[i]] = torch.tensor(row.request.prompt_ids, device=self.device)
        positions, mask = self.state.begin_prefill(lengths, self.device)
        hidden = self._forward(rows, ids, positions, mask)
        self.state.end_prefill(lengths)
        last = torch.tensor(lengths, device=self.device) - 1
        logits = self.head(hidden[torch.arange(len(rows), device=self.device), last])
        gates = self._gates(rows, last)
        for i, row in enumerate(rows):
            row.logits, row.gates = logits[i], None if gates is None else gates[i]
            request = row.request
            if request.echo and request.logprobs is not None:
                prompt_logits = self.head(hidden[i, :lengths[i] - 1])
                row.scores = ([TokenLogprob(request.prompt_ids[0], None)]
                              + _scored(prompt_logits, request.prompt_ids[1:], request.logprobs))
        self.rows += rows

    def _decode(self) -> None:
        ids = torch.tensor([[row.tokens[-1]] for row in self.rows], dtype=torch.long, device=self.device)
        positions, mask = self.state.begin_decode(self.device)
        logits = self.head(self._forward(self.rows, ids, positions, mask)[:, -1])
        self.state.end_decode()
        gates = self._gates(self.rows, None)
        for i, row in enumerate(self.rows):
            row.logits, row.gates = logits[i], None if gates is None else gates[i]

    def _gates(self, rows: list[Row], positions: torch.Tensor | None) -> list[torch.Tensor | None] | None:
        """Each row's gates at ``positions`` (the last by default), averaged over its routers; only
        when a row asked for its routing."""
        if not any(row.request.routing and row.routers for row in rows):
            return None
        gates = []
        for i, row in enumerate(rows):
            at, mine = -1 if positions is None else int(positions[i]), i if self.bank is None else self.bank.local.get(i)
            picked = [router._last[1][mine, at].detach() for router in row.routers
                      if row.request.routing and router._last is not None and router._last[1].dim() == 3]
            gates.append(torch.stack(picked).float().mean(dim=0).cpu() if picked else None)
        return gates


def _routers(model) -> list:
    from ..experts.inject import routers

    serving = getattr(model, "modula_serving_routers", None)
    if serving is not None:
        return list(serving)
    return list(routers(model).values()) if getattr(model, "modula_spec", None) is not None else []


def generate_batch(model, tokenizer, requests: list[GenerationRequest], slots: int | None = None
                   ) -> list[GenerationResult]:
    """Decode ``requests`` to the end (see the module docstring); results in request order. With
    ``slots`` below the number of requests, the rest join as running rows finish."""
    if not requests:
        return []
    slots = slots or len(requests)
    decoder, waiting = Decoder(model, tokenizer, slots), list(requests)
    results: dict[int, GenerationResult] = {}
    while waiting or decoder.running:
        free = slots - decoder.running
        new, waiting = waiting[:free], waiting[free:]
        for request, event in decoder.step(new):
            if event.result is not None:
                results[id(request)] = event.result
    return [results[id(request)] for request in requests]

"""A KV cache of slots, one per running row, so rows can join and leave a batch at every step.

The running rows of one model hold slots ``0 .. n-1`` of per-layer tensors ``[slots, kv heads,
capacity, head dim]``; row ``b``'s token at position ``p`` sits at index ``p`` of slot ``b``. So
positions are the row's own (``position_ids`` count its tokens only), and a row's logits do not
depend on what it is batched with.

- **decode**: one token per running row; each writes its keys and values at its own position, and
  attends to ``0 .. position`` of its slot (a 4D mask; the model takes it as given). The keys
  returned are a view of slots ``0 .. n-1`` up to the longest row: nothing is copied.
- **prefill**: new rows, right-padded to one length, go into slots ``n .. n+k-1`` and attend
  causally to their own real tokens; their keys are written from index 0.
- **leave**: a finished row's slot takes the last running row's contents (one row's copy), so the
  running rows stay in slots ``0 .. n-1``.
- capacity grows in steps of ``GROW`` positions (a copy of the running rows) and slots double
  when more rows run than there are slots.

A model whose layers keep caches of their own (``mode``'s expert layers) asks for ``sibling()``:
another cache over the same slots, moved and grown with this one.
"""
from __future__ import annotations

import torch
from transformers.cache_utils import Cache, CacheLayerMixin

GROW = 256


class SlotLayer(CacheLayerMixin):
    """One attention layer's keys and values, in the slots of its ``SlotState``."""
    is_sliding = False

    def __init__(self, state: "SlotState"):
        super().__init__()
        self.state = state

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        shape = (self.state.slots, key_states.shape[1], self.state.capacity, key_states.shape[-1])
        self.keys = key_states.new_zeros(shape)
        self.values = value_states.new_zeros(shape[:3] + value_states.shape[-1:])
        self.dtype, self.device, self.is_initialized = key_states.dtype, key_states.device, True

    def resize(self, slots: int, capacity: int, running: int, length: int) -> None:
        """Reallocate to ``[slots, heads, capacity, dim]``, keeping the running rows' first ``length``."""
        if not self.is_initialized:
            return
        for name in ("keys", "values"):
            old = getattr(self, name)
            new = old.new_zeros((slots, old.shape[1], capacity, old.shape[3]))
            new[:running, :, :length] = old[:running, :, :length]
            setattr(self, name, new)

    def move(self, source: int, target: int, length: int) -> None:
        if self.is_initialized:
            self.keys[target, :, :length] = self.keys[source, :, :length]
            self.values[target, :, :length] = self.values[source, :, :length]

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        state = self.state
        if state.phase == "decode":
            rows, at = state.rows_index, state.write_at
            self.keys[rows, :, at] = key_states[:, :, 0]
            self.values[rows, :, at] = value_states[:, :, 0]
            return self.keys[:state.running, :, :state.attend], self.values[:state.running, :, :state.attend]
        first, width = state.running, key_states.shape[2]          # prefill: new rows after the running ones
        self.keys[first:first + key_states.shape[0], :, :width] = key_states
        self.values[first:first + key_states.shape[0], :, :width] = value_states
        return key_states, value_states

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.state.attend, 0

    def get_seq_length(self) -> int:
        return self.state.attend

    def get_max_length(self) -> int:
        return self.state.capacity


class SlotState:
    """Which rows run (slots ``0 .. running-1``), their lengths, and every layer holding slots."""

    def __init__(self, slots: int = 8):
        self.slots, self.capacity, self.running = slots, GROW, 0
        self.lengths: list[int] = []                 # tokens in the cache per running row
        self.layers: list[SlotLayer] = []
        self.phase, self.attend = "decode", 0
        self.rows_index = self.write_at = None

    def _reserve(self, rows: int, length: int) -> None:
        slots = max(self.slots, 1 << (rows - 1).bit_length())
        capacity = max(self.capacity, -(-length // GROW) * GROW)
        if (slots, capacity) != (self.slots, self.capacity):
            kept = max(self.lengths, default=0)
            for layer in self.layers:
                layer.resize(slots, capacity, self.running, kept)
            self.slots, self.capacity = slots, capacity

    def begin_prefill(self, lengths: list[int], device) -> tuple[torch.Tensor, torch.Tensor]:
        """New rows of ``lengths`` real tokens (right-padded to the longest): ``(position_ids, mask)``."""
        width = max(lengths)
        self._reserve(self.running + len(lengths), width + 1)
        self.phase, self.attend = "prefill", width
        positions = torch.arange(width, device=device).expand(len(lengths), width)
        real = positions < torch.tensor(lengths, device=device)[:, None]
        causal = torch.ones(width, width, dtype=torch.bool, device=device).tril()
        return positions, (causal[None] & real[:, None, :])[:, None]

    def end_prefill(self, lengths: list[int]) -> None:
        self.running += len(lengths)
        self.lengths += list(lengths)
        self.phase = "decode"

    def begin_decode(self, device) -> tuple[torch.Tensor, torch.Tensor]:
        """One token per running row at its own position: ``(position_ids, mask)``."""
        self._reserve(self.running, max(self.lengths) + 1)
        at = torch.tensor(self.lengths, device=device)
        self.phase, self.attend = "decode", max(self.lengths) + 1
        self.rows_index, self.write_at = torch.arange(self.running, device=device), at
        mask = torch.arange(self.attend, device=device)[None] <= at[:, None]
        return at[:, None], mask[:, None, None]

    def end_decode(self) -> None:
        self.lengths = [n + 1 for n in self.lengths]

    def leave(self, row: int) -> int | None:
        """Free ``row``'s slot; the last running row moves into it. Returns the row that moved (or None)."""
        last = self.running - 1
        moved = None
        if row != last:
            for layer in self.layers:
                layer.move(last, row, self.lengths[last])
            self.lengths[row], moved = self.lengths[last], last
        self.lengths.pop()
        self.running -= 1
        return moved


class SlotCache(Cache):
    """The model's cache over a ``SlotState`` (layers made as the model asks for them)."""

    def __init__(self, state: SlotState | None = None):
        super().__init__(layers=[])
        self.state = state or SlotState()

    def update(self, key_states, value_states, layer_idx: int, *args, **kwargs):
        while len(self.layers) <= layer_idx:
            layer = SlotLayer(self.state)
            self.layers.append(layer)
            self.state.layers.append(layer)
        return self.layers[layer_idx].update(key_states, value_states)

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self.state.attend

    def sibling(self) -> "SlotCache":
        """Another cache over the same slots (a layer's own experts: ``mode``)."""
        return SlotCache(self.state)

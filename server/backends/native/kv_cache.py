"""The running batch's KV cache: one left-padded tensor per layer that sequences join and leave.

transformers' DynamicLayer grows by torch.cat on every decode step (a full copy of the cache per
token). Here each layer keeps spare room on the right, so a decode step writes in place and the
copy happens only when a sequence joins, leaves, or the room runs out (amortized by doubling).
Rows are left-padded to a common length; the attention mask hides the padding and every row
gets its own position ids, so a sequence computes what it would alone.
"""

from __future__ import annotations

import torch
from transformers.cache_utils import Cache, DynamicLayer


class RoomyLayer(DynamicLayer):
    """A DynamicLayer whose storage has spare capacity on the sequence axis."""

    def __init__(self, keys: torch.Tensor, values: torch.Tensor, room: int):
        super().__init__()
        self.dtype, self.device = keys.dtype, keys.device
        self.is_initialized = True
        self._length = keys.shape[-2]
        self._k = self._alloc(keys, room)
        self._v = self._alloc(values, room)
        self._sync()

    @staticmethod
    def _alloc(src: torch.Tensor, room: int) -> torch.Tensor:
        b, h, t, d = src.shape
        buf = src.new_empty((b, h, t + room, d))
        buf[:, :, :t] = src
        return buf

    def _sync(self) -> None:
        self.keys = self._k[:, :, : self._length]
        self.values = self._v[:, :, : self._length]

    def update(self, key_states, value_states, *args, **kwargs):
        n = key_states.shape[-2]
        if self._length + n > self._k.shape[-2]:
            room = max(n, self._k.shape[-2])  # double: the copy cost stays amortized O(1) per token
            self._k = self._alloc(self.keys, room)
            self._v = self._alloc(self.values, room)
        self._k[:, :, self._length : self._length + n] = key_states
        self._v[:, :, self._length : self._length + n] = value_states
        self._length += n
        self._sync()
        return self.keys, self.values


class BatchKV:
    """KV tensors + attention mask of the running batch, row i belonging to running sequence i."""

    def __init__(self, room: int = 64):
        self.room = room
        self.layers: list[RoomyLayer] | None = None
        self.mask: torch.Tensor | None = None  # [B, T] long, 0 where left padding

    @property
    def batch_size(self) -> int:
        return 0 if self.mask is None else self.mask.shape[0]

    @property
    def length(self) -> int:
        return 0 if self.mask is None else self.mask.shape[1]

    def nbytes(self) -> int:
        if not self.layers:
            return 0
        return sum(layer._k.numel() * layer._k.element_size() * 2 for layer in self.layers)

    def add(self, cache: Cache) -> None:
        """Append one prefilled sequence (batch 1 cache) as the last row."""
        new = [(layer.keys, layer.values) for layer in cache.layers]
        n = new[0][0].shape[-2]
        new_mask = torch.ones((1, n), dtype=torch.long, device=new[0][0].device)
        if self.layers is None:
            self.layers = [RoomyLayer(k, v, self.room) for k, v in new]
            self.mask = new_mask
            return
        t = self.length
        width = max(t, n)
        old = [(self._left_pad(la.keys, width - t), self._left_pad(la.values, width - t)) for la in self.layers]
        new = [(self._left_pad(k, width - n), self._left_pad(v, width - n)) for k, v in new]
        self.layers = [
            RoomyLayer(torch.cat([ok, nk]), torch.cat([ov, nv]), self.room) for (ok, ov), (nk, nv) in zip(old, new)
        ]
        self.mask = torch.cat([self._left_pad_mask(self.mask, width - t), self._left_pad_mask(new_mask, width - n)])

    def keep(self, rows: list[int]) -> None:
        """Keep only these rows (in this order); drop the columns that became padding in every row."""
        if not rows:
            self.layers, self.mask = None, None
            return
        idx = torch.tensor(rows, dtype=torch.long, device=self.mask.device)
        mask = self.mask.index_select(0, idx)
        first_real = int((mask.sum(dim=0) > 0).nonzero()[0])
        mask = mask[:, first_real:]
        self.layers = [
            RoomyLayer(
                layer.keys.index_select(0, idx)[:, :, first_real:],
                layer.values.index_select(0, idx)[:, :, first_real:],
                self.room,
            )
            for layer in self.layers
        ]
        self.mask = mask

    def step_inputs(self) -> tuple[Cache, torch.Tensor, torch.Tensor]:
        """Cache, attention mask (with the new token's column) and position ids for one decode step."""
        ones = torch.ones((self.batch_size, 1), dtype=self.mask.dtype, device=self.mask.device)
        self.mask = torch.cat([self.mask, ones], dim=1)
        positions = self.mask.sum(dim=1, keepdim=True) - 1
        return Cache(layers=self.layers), self.mask, positions

    @staticmethod
    def _left_pad(t: torch.Tensor, pad: int) -> torch.Tensor:
        if pad == 0:
            return t
        b, h, _, d = t.shape
        return torch.cat([t.new_zeros((b, h, pad, d)), t], dim=2)

    @staticmethod
    def _left_pad_mask(m: torch.Tensor, pad: int) -> torch.Tensor:
        if pad == 0:
            return m
        return torch.cat([m.new_zeros((m.shape[0], pad)), m], dim=1)

"""A layer's cache that reads only some blocks per decode step (Quest / NOSA style).

Every block keeps the channel-wise min and max of its keys (post-RoPE, fp16, counted in the
bytes). At each decode step the selector picks, per KV head, the blocks whose bounds promise
the highest scores for the current query; attention reads those blocks plus the sinks and
the residual. Nothing is deleted, so a later step can pick any block again. Prefill reads
every block.

On a sliding-window layer the blocks are those inside the window (older ones are freed as
usual); there is no sink block to force (the sequence's first tokens left the window), and a
chosen block that is partly out of the window has those tokens masked.
"""

from __future__ import annotations

import dataclasses

import torch

from kvtier.kv.cache import LayerKV, Part


class BlockSelectKV(LayerKV):
    """``LayerKV`` plus per-block key bounds and a per-step block choice."""

    attends_all = False

    def __init__(self, selector, *args, **kwargs):
        super().__init__(*args, **kwargs)
        if self.window is not None and getattr(selector, "sink_block", False):
            selector = dataclasses.replace(selector, sink_block=False)  # the sinks left the window
        self.selector = selector
        self.bounds = torch.empty((self.n_kv, 0, 2, self.head_dim), dtype=torch.float16)
        self.picked: torch.Tensor | None = None  # (Hkv, k) blocks read at the last decode step
        self.read_bytes = 0  # bytes of blocks and bounds read at the last decode step
        self.reused = 0.0    # share of the last step's blocks that the step before read too
        self.q: torch.Tensor | None = None  # the newest queries (a selector with a query-agnostic part)
        self.rank: torch.Tensor | None = None  # (Hkv, n_blocks) query-agnostic block scores

    def _seal(self, k: torch.Tensor, v: torch.Tensor, pos: int) -> None:
        b = torch.stack([k.amin(2), k.amax(2)], 2).to(torch.float16)  # (Hkv, n, 2, D)
        self.bounds = torch.cat([self.bounds, b], 1)
        super()._seal(k, v, pos)

    def select(self, q: torch.Tensor) -> list[Part]:
        """The parts one decode query ``(Hq, 1, D)`` (pre-scaled) attends: the sinks, each KV
        head's chosen blocks, the residual."""
        n = len(self.slots)
        bounds = 4 * self.n_kv * self.head_dim / max(self.pool.slot_bytes(), 1)  # fp16 min, max
        k = self.selector.n_blocks(n, bounds) if n else 0
        if n == 0 or k >= n:
            self.picked, self.read_bytes = None, n * self.pool.slot_bytes()
            return self.parts()
        fixed = None
        if self.rank is not None:
            if self.rank.shape[1] < n:  # blocks sealed since the prompt: ranked as the best so far
                top = self.rank.amax(1, keepdim=True).expand(-1, n - self.rank.shape[1])
                self.rank = torch.cat([self.rank, top], 1)
            fixed = self.selector.fixed(self.rank, n, k)
        idx = self.selector.pick(q.reshape(self.n_kv, -1, q.shape[-1]), self.bounds, k, fixed)
        if self.picked is not None and self.picked.shape == idx.shape:
            same = sum(len(set(a.tolist()) & set(b.tolist())) for a, b in zip(idx, self.picked))
            self.reused = same / idx.numel()
        self.picked = idx
        self.read_bytes = idx.numel() * (self.pool.slot_bytes() // self.n_kv) + self.bounds.numel() * 2
        return self._sink_parts() + [self._gathered(idx)] + self._residual_parts()

    def _drop(self, n: int) -> None:
        """Free the ``n`` oldest blocks (out of a sliding window), with their bounds and rank."""
        super()._drop(n)
        self.bounds = self.bounds[:, n:]
        if self.rank is not None:
            self.rank = self.rank[:, n:]

    def observe(self, q: torch.Tensor, scale: float) -> None:
        want = getattr(self.selector, "queries", 0)
        if want and q.shape[1] > 1:  # the prompt's last queries
            q = q.detach() * scale
            self.q = q[:, -want:] if self.q is None else torch.cat([self.q, q], 1)[:, -want:]

    def compress(self) -> None:
        """End of a prefill chunk: rank the blocks for the query-agnostic part by the chunk's
        last queries (a later chunk, such as the question after a document, ranks again)."""
        if self.q is None or not self.slots:
            return
        k, _ = self.pool.read(self.slots, torch.float32)
        if self.codec.pre_rope:
            k = self.rope.rotate(k, self.block_start(self.first_block))
        self.rank = self.selector.rank(self.q, k, self.length, self.block_size, self.block_start(self.first_block))
        self.q = None

    def _gathered(self, idx: torch.Tensor) -> Part:
        """One part holding, for each KV head, its own chosen blocks."""
        slots = torch.tensor(self.slots)[idx]  # (Hkv, k) pool slots
        fields = {name: torch.stack([t[h, slots[h]] for h in range(self.n_kv)])
                  for name, t in self.pool.data.items()}
        k_blocks = idx.shape[1]
        start = self.block_start(self.first_block)
        bias = None
        if self.window is not None:  # placed just before the residual (all inside the window);
            # the tokens of a chosen block that left the newest query's window are masked
            real = start + idx[..., None] * self.block_size + torch.arange(self.block_size)
            gone = real.reshape(self.n_kv, -1) <= self.length - 1 - self.window
            if gone.any():
                bias = torch.zeros(gone.shape).masked_fill(gone, float("-inf"))
            start = self.block_start(self.first_block + len(self.slots)) - k_blocks * self.block_size

        def positions():  # (Hkv, N): each head's blocks sit at their own positions
            return (self.block_start(self.first_block) + idx[..., None] * self.block_size
                    + torch.arange(self.block_size)).reshape(self.n_kv, -1)

        def load():
            k, v = self.codec.decode(fields, self.dtype)
            if self.codec.pre_rope:
                k = self.rope.rotate_at(k.float(), positions()).to(self.dtype)
            return k, v
        score = None
        if self.scores and bias is None:
            def score(q):  # pre-RoPE keys: each head's blocks at their own positions
                rope = self.rope.rows(positions()) if self.codec.pre_rope else None
                return self.codec.attend(q, fields, rope)
        part = Part.encoded(start, k_blocks * self.block_size, self.n_kv, load, score)
        part.bias = bias
        return part

    def nbytes(self) -> int:
        """The blocks and buffers, the key bounds and the query-agnostic ranking."""
        extra = 0 if self.rank is None else 4 * self.rank.numel()
        extra += 0 if self.q is None else self.q.numel() * self.q.element_size()
        return super().nbytes() + self.bounds.numel() * self.bounds.element_size() + extra

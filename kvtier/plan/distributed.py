"""Beyond one machine, on paper: a sequence's KV split across N machines as Infinite-LLM's
DistAttention does. SIMULATION ONLY: kvtier runs on one machine today; nothing here is
measured across machines.

Each machine holds ``1/N`` of the sequence's blocks and attends them where they are (the
cost model's attention on that machine's device); the first machine also runs the weights.
Per layer, the query goes out and every machine's partial result (max, sum, weighted values)
comes back over the network, then the pieces merge by log-sum-exp, as kvtier's tiers merge
theirs. The step is the weights' time plus, per layer, the slowest machine's attention share
and one network round trip with the partials. A machine fits when the weights (every
instance holds them, as Infinite-LLM's instances do) and its KV share fit its memory.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from kvtier.plan.costs import Step, cost
from kvtier.plan.hardware import Hardware


@dataclass
class Split:
    machines: int
    context: int
    step_s: float
    attention_s: float
    network_s: float
    weights_s: float
    kv_bytes_per_machine: float
    fits: bool

    def row(self) -> dict:
        return {"simulated": True, "machines": self.machines, "context": self.context,
                "step_ms": 1e3 * self.step_s, "tok_s": 1 / self.step_s, "attention_ms": 1e3 * self.attention_s,
                "network_ms": 1e3 * self.network_s, "weights_ms": 1e3 * self.weights_s,
                "kv_bytes_per_machine": self.kv_bytes_per_machine, "fits": self.fits}


def split(step: Step, hw: Hardware, machines: int | None = None) -> Split:
    """The decode step of ``step`` with its KV spread over ``machines`` (default: the
    hardware file's ``machines``) joined by ``hw.network``."""
    n = machines or hw.machines
    whole = cost(replace(step, tiers=None, attend=()), hw)
    attn = sum(o.seconds for o in whole.ops if o.kind == "attention")
    launches = sum(o.seconds for o in whole.ops if o.kind == "launch")
    rest = whole.seconds - attn
    s = step.model
    share = attn / n  # each machine attends its 1/N of every layer's blocks, in parallel
    net = 0.0
    if n > 1:
        if hw.network <= 0:
            from kvtier.errors import KvtierError
            raise KvtierError(f"hardware {hw.name!r} gives no network bandwidth: set network = \"25 GB/s\" "
                              "in its file to plan across machines")
        q_bytes = 2.0 * step.batch * s.n_heads * s.head_dim  # the query out (bf16)
        partial = 4.0 * step.batch * s.n_heads * (s.head_dim + 2)  # (max, sum, values) back, fp32
        per_layer = 2 * hw.network_latency + (q_bytes + partial * (n - 1)) / hw.network
        net = per_layer * s.n_layers
    dev = hw.devices[hw.compute()]
    per_machine = whole.kv_bytes / n
    weights = sum(o.bytes for o in whole.ops if o.kind in ("gemv", "gemm"))  # every machine holds them
    return Split(n, step.context, rest + share + net, share, net, rest - launches, per_machine,
                 not dev.memory or per_machine + weights <= dev.memory)


def table(step: Step, hw: Hardware, contexts: list[int], machine_counts: list[int]) -> list[dict]:
    """Simulated rows for every (context, machine count)."""
    return [split(replace(step, context=c), hw, m).row() | {"model": step.model.name, "kv": step.kv}
            for c in contexts for m in machine_counts]

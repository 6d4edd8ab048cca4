"""``kvtier plan``: a bytes-per-FLOP cost model of every operation in a decode step or a
prefill chunk, placing each on a device or tier, with this machine measured once by a probe.

- :mod:`~kvtier.plan.hardware`: what a machine can do (TOML; shipped files in ``devices/``);
- :mod:`~kvtier.plan.probe`: ``kvtier plan --probe`` measures this machine;
- :mod:`~kvtier.plan.shapes`: a model's shape, from its config or a named larger shape;
- :mod:`~kvtier.plan.launches`: operations per step, counted on kvtier's own forward;
- :mod:`~kvtier.plan.costs`: the operations, their bytes, FLOPs, Op/B and time;
- :mod:`~kvtier.plan.decide`: attend placement, device split, codec, batch;
- :mod:`~kvtier.plan.distributed`: a sequence's KV across machines (simulation);
- :mod:`~kvtier.plan.validate`: predictions against kvtier's measured bench JSON.
"""

from __future__ import annotations

from kvtier.plan.costs import Cost, Op, Step, cost


def auto_attend(model, spec, store, context: int | None = None):
    """``attend=auto`` for a :class:`~kvtier.kv.store.TierStore` and a loaded ``model``:
    (shares per lower tier, the :class:`~kvtier.plan.decide.Decision`). The step planned is one
    sequence at ``context`` tokens (default: the model's context, at most 32K), pages warm."""
    from kvtier.dtypes import dtype_name
    from kvtier.plan import decide, hardware
    from kvtier.plan.shapes import from_config

    shape = from_config(getattr(model, "key", None) or "model", model.hf_config)
    context = context or min(shape.max_context, 32768)
    hw = hardware.load("this")
    step = Step(shape, context, 1, str(spec), getattr(model, "weight_format", "dense"), dtype_name(model.dtype),
                str(store), ())
    return decide.attend(step, hw)


__all__ = ["Cost", "Op", "Step", "auto_attend", "cost"]

"""A GGUF file's own packed tensors (Q8_0, Q4_0, Q4_1), under the model's Hugging Face names.

Each is checked against the float weight the loader converted from the same file (the
dequantized values must match, rows in the same order): a tensor that does not match, after
undoing llama.cpp's q/k row permutation where it applies, is left out and its format
quantizes it from the floats instead, so a naming or layout surprise costs speed, not
correctness.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

from kvtier.weights.quant import GroupQuant

NAMES = {  # GGUF tensor name (after "blk.N.") -> HF name (after "model.layers.N.")
    "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj", "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}
TOP = {"token_embd": "model.embed_tokens", "output": "lm_head"}


def source(folder: Path) -> Path | None:
    """The GGUF a converted model folder was made from, if it is still there."""
    try:
        path = Path(json.loads((folder / "kvtier.json").read_text())["source"])
    except (OSError, ValueError, KeyError):
        return None
    return path if path.exists() else None


def hf_name(name: str) -> str | None:
    base = name.removesuffix(".weight")
    if base in TOP:
        return TOP[base] + ".weight"
    parts = base.split(".")
    if len(parts) == 3 and parts[0] == "blk" and parts[2] in NAMES:
        return f"model.layers.{parts[1]}.{NAMES[parts[2]]}.weight"
    return None


def _packed(kind: str, data: np.ndarray) -> GroupQuant | None:
    """``data``: the tensor's bytes, ``(rows, bytes per row)``."""
    rows = data.shape[0]
    if kind == "Q8_0":
        b = data.reshape(rows, -1, 34)
        d = torch.from_numpy(np.ascontiguousarray(b[..., :2]).view(np.float16)[..., 0])
        codes = torch.from_numpy(np.ascontiguousarray(b[..., 2:]).view(np.int8).reshape(rows, -1))
        return GroupQuant(codes, d, None, 8)
    if kind == "Q4_1":
        b = data.reshape(rows, -1, 20)
        d = torch.from_numpy(np.ascontiguousarray(b[..., :2]).view(np.float16)[..., 0])
        m = torch.from_numpy(np.ascontiguousarray(b[..., 2:4]).view(np.float16)[..., 0])
        return GroupQuant(torch.from_numpy(np.ascontiguousarray(b[..., 4:]).reshape(rows, -1)), d, m, 4)
    if kind == "Q4_0":
        b = data.reshape(rows, -1, 18)
        d = torch.from_numpy(np.ascontiguousarray(b[..., :2]).view(np.float16)[..., 0])
        return GroupQuant(torch.from_numpy(np.ascontiguousarray(b[..., 2:]).reshape(rows, -1)), d,
                          (-8 * d.float()).half(), 4)
    return None


def _rope_order(rows: int, heads: int) -> torch.Tensor:
    """llama.cpp stores q/k rows interleaved for its RoPE; this index puts them back."""
    return torch.arange(rows).reshape(heads, rows // heads // 2, 2).transpose(1, 2).reshape(-1)


def raw_tensors(gguf: Path, floats: dict[str, torch.Tensor], hf_config) -> dict[str, GroupQuant]:
    """The GGUF's packed tensors that equal ``floats`` (the converted weights), by HF name."""
    from gguf import GGUFReader

    out = {}
    for t in GGUFReader(str(gguf)).tensors:
        name = hf_name(t.name)
        w = floats.get(name) if name else None
        if w is None or w.dim() != 2:
            continue
        packed = _packed(t.tensor_type.name, np.asarray(t.data))
        if packed is None or packed.shape != tuple(w.shape):
            continue
        candidates = [packed]
        heads = {"q_proj": hf_config.num_attention_heads, "k_proj": hf_config.num_key_value_heads}
        for proj, h in heads.items():
            if proj in name and w.shape[0] % (2 * h) == 0:
                candidates.append(packed.permute_rows(_rope_order(w.shape[0], h)))
        for c in candidates:
            if _same(c, w):
                out[name] = c
                break
    return out


def _same(packed: GroupQuant, w: torch.Tensor) -> bool:
    ref = w.float()
    tol = 1e-5 * float(ref.abs().max()) + 1e-7
    step = max(1, ref.shape[0] // 64)  # a sample of rows is enough to tell the order apart
    return bool((packed.permute_rows(torch.arange(0, ref.shape[0], step)).dense()
                 - ref[::step]).abs().max() <= tol)

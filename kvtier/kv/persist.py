"""Save a sequence's cache to a file and load it back: prefill a long document once, ask many
questions about it across runs.

The file is safetensors (no pickle): every layer's sink and residual tokens and its blocks in
encoded form (codec bytes, exactly as held), gathered from whatever tiers they were on. The
header records the format version, the model (a fingerprint of its configuration and weights),
the cache spec, block size, compute dtype and the token ids, plus a CRC-32 of every tensor.
Loading checks all of them and refuses a file made by a different model, cache spec or format
version, or whose bytes do not match their checksums. A file is written to a temporary name
and renamed, so a crash never leaves half a file under the real name.
"""

from __future__ import annotations

import ctypes
import hashlib
import json
import os
import zlib
from dataclasses import dataclass
from pathlib import Path

import torch

from kvtier.dtypes import dtype_name
from kvtier.errors import KvtierError

# 2: rotatekv's values are rotated without the key reordering; 3: and reordered within each head
# by their own calibrated RMS. Caches saved by an earlier version would decode wrongly
FORMAT, VERSION = "kvtier-cache", "3"
SUFFIX = ".kvcache"


@dataclass
class Prefix:
    """A saved cache, checked and ready to continue: ``generate(..., prefix=...)`` restores a
    fresh copy per request. ``token_ids`` are the document's tokens; the last of them has not
    been run yet (its logits start the continuation)."""

    path: Path
    token_ids: list[int]
    spec: str
    nbytes: int  # size of the file

    @property
    def length(self) -> int:
        """Tokens in the cache (all but the last document token)."""
        return len(self.token_ids) - 1


def fingerprint(model) -> str:
    """Identifies a model's architecture and weights, whatever the compute dtype: its shape
    parameters plus a strided sample of every weight tensor rounded to bf16."""
    cached = getattr(model, "_fingerprint", None)
    if cached:
        return cached
    h = hashlib.sha256()
    c = model.hf_config
    h.update(json.dumps([c.model_type, model.n_layers, model.n_kv, model.head_dim,
                         getattr(c, "hidden_size", 0), getattr(c, "vocab_size", 0)]).encode())
    for name in sorted(model.w):
        w = model.w[name]
        t = (w if isinstance(w, torch.Tensor) else w.dense()).reshape(-1)  # packed: its values
        sample = t[:: max(1, t.numel() // 4096)].to(torch.bfloat16).float()
        h.update(name.encode() + str(tuple(w.shape)).encode())
        h.update(sample.cpu().numpy().tobytes())
    model._fingerprint = h.hexdigest()[:32]
    return model._fingerprint


def save(path: str | Path, runner, cache, token_ids: list[int], model_name: str) -> int:
    """Write ``cache`` (which holds ``token_ids[:-1]``) to ``path``; returns the bytes written."""
    from safetensors.torch import save_file

    path = Path(path).expanduser()
    if cache.length != len(token_ids) - 1:
        raise KvtierError(f"the cache holds {cache.length} tokens, not {len(token_ids) - 1}")
    tensors, layers = {}, []
    for i, layer in enumerate(cache.layers):
        counters, held = layer.snapshot()
        layers.append(counters)
        tensors.update({f"{i}.{k}": t for k, t in held.items()})
    crc = {k: zlib.crc32(_bytes(t)) for k, t in tensors.items()}
    meta = {"format": FORMAT, "version": VERSION, "model": model_name,
            "fingerprint": fingerprint(runner.model), "spec": str(runner.spec),
            "block_size": str(runner.block_size), "dtype": dtype_name(runner.dtype),
            "tokens": json.dumps(token_ids), "layers": json.dumps(layers), "crc32": json.dumps(crc)}
    meta["header_crc32"] = str(_header_crc(meta))
    if not path.parent.is_dir():
        raise KvtierError(f"cannot save the cache to {path}: folder {path.parent} does not exist")
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    try:
        save_file(tensors, tmp, metadata=meta)
        tmp.replace(path)
    except Exception as e:  # safetensors reports a full disk as its own error, not OSError
        raise KvtierError(f"cannot save the cache to {path}: {e}; nothing was written there") from e
    finally:
        tmp.unlink(missing_ok=True)  # gone after the rename; removed when the write failed
    return path.stat().st_size


def open_prefix(path: str | Path, runner, model_name: str) -> Prefix:
    """Check a saved cache against this runner (model, spec, block size, dtype, version)."""
    path = Path(path).expanduser()
    meta = read_meta(path)
    want = {"spec": str(runner.spec), "block_size": str(runner.block_size),
            "dtype": dtype_name(runner.dtype)}
    if meta.get("fingerprint") != fingerprint(runner.model):
        raise KvtierError(f"{path} was made with model {meta.get('model')!r}, not this {model_name!r} "
                          "(weights differ); load it with the model that made it")
    for key, flag in (("spec", "--kv"), ("block_size", "block_size"), ("dtype", "--dtype")):
        if meta.get(key) != want[key]:
            raise KvtierError(f"{path} was made with {key} {meta.get(key)}, this run uses {want[key]}; "
                              f"run with {flag} {meta.get(key)} to use it")
    return Prefix(path, json.loads(meta["tokens"]), meta["spec"], path.stat().st_size)


def restore(prefix: Prefix, runner):
    """A new cache for ``runner`` holding the saved tokens (every tensor's checksum verified)."""
    meta = read_meta(prefix.path)
    crc, layers = json.loads(meta["crc32"]), json.loads(meta["layers"])
    cache = runner.new_cache(reserve=0)
    if cache.home is not None:
        cache.home.ids = list(prefix.token_ids[:-1])  # a recompute tier rebuilds from these
    if len(layers) != len(cache.layers):
        cache.close()
        raise KvtierError(f"{prefix.path} holds {len(layers)} layers, the model has {len(cache.layers)}")
    try:
        with open(prefix.path, "rb") as f:
            entries, base = _index(f, prefix.path)
            for i, (layer, counters) in enumerate(zip(cache.layers, layers)):
                held = {}
                for name in [k for k in crc if k.split(".", 1)[0] == str(i)]:
                    t = _read(f, base, entries, name, prefix.path)
                    if zlib.crc32(_bytes(t)) != crc[name]:
                        raise KvtierError(f"{prefix.path} is damaged: tensor {name} (layer {i}) does not "
                                          "match its checksum; save the cache again")
                    held[name.split(".", 1)[1]] = t
                layer.restore(counters, held)
    except BaseException:
        cache.close()
        raise
    _trim()
    return cache


def _trim() -> None:
    """Give the read buffers back to the OS (glibc keeps freed heap memory otherwise)."""
    try:
        ctypes.CDLL(None).malloc_trim(0)
    except (OSError, AttributeError):  # not glibc
        pass


def read_meta(path: Path) -> dict[str, str]:
    from safetensors import safe_open

    if not path.is_file():
        raise KvtierError(f"no saved cache at {path}: save one with `kvtier cache save`")
    try:
        with safe_open(path, "pt") as f:
            meta = f.metadata() or {}
    except Exception as e:
        raise KvtierError(f"{path} is not a kvtier cache file or is damaged ({e})") from e
    if meta.get("format") != FORMAT:
        raise KvtierError(f"{path} is not a kvtier cache file (no {FORMAT} header)")
    if meta.get("version") != VERSION:
        raise KvtierError(f"{path} has cache format version {meta.get('version')}; this kvtier reads "
                          f"version {VERSION}: save the cache again with this kvtier")
    if meta.get("header_crc32") != str(_header_crc(meta)):
        raise KvtierError(f"{path} is damaged: its header (token ids, layout, checksums) does not match its "
                          "checksum; save the cache again")
    return meta


_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
           "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
           "BOOL": torch.bool, "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2}


def _index(f, path: Path) -> tuple[dict, int]:
    """The safetensors header of an open file: ``{name: entry}`` and where the data starts."""
    try:
        n = int.from_bytes(f.read(8), "little")
        head = json.loads(f.read(n))
    except ValueError as e:
        raise KvtierError(f"{path} is damaged (its header does not parse: {e}); save the cache again") from e
    head.pop("__metadata__", None)
    return head, 8 + n


def _read(f, base: int, entries: dict, name: str, path: Path) -> torch.Tensor:
    """One tensor read into memory (not mapped: restoring a large cache into small tiers keeps
    resident memory to one layer at a time)."""
    entry = entries.get(name)
    if entry is None or entry.get("dtype") not in _DTYPES:
        raise KvtierError(f"{path} is damaged: tensor {name} is missing or has an unknown type; save the cache again")
    start, end = entry["data_offsets"]
    raw = os.pread(f.fileno(), end - start, base + start)
    if len(raw) != end - start:
        raise KvtierError(f"{path} is damaged: shorter than its header says (truncated); save the cache again")
    dtype = _DTYPES[entry["dtype"]]
    if not raw:
        return torch.empty(entry["shape"], dtype=dtype)
    return torch.frombuffer(bytearray(raw), dtype=dtype).reshape(entry["shape"])


def _header_crc(meta: dict[str, str]) -> int:
    """A CRC-32 over the header fields (token ids, counters, checksums...), so that a damaged
    header is refused like a damaged tensor."""
    return zlib.crc32(json.dumps({k: v for k, v in sorted(meta.items()) if k != "header_crc32"}).encode())


def _bytes(t: torch.Tensor) -> bytes:
    return t.contiguous().view(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b""

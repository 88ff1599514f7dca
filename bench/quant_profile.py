"""Profile one forward + backward of lorakit and PEFT on the same NF4 MiniLM (1 thread), then time
both interleaved: ``python bench/quant_profile.py > bench/results/quant_profile_minilm_nf4.txt``.

LoRA r=8 all-linear + the classifier (modules_to_save), as in quant_bench.py; torch.profiler's
table of the ops by self CPU time for each, then the median step times of 5 interleaved rounds
and the median of the per-round ratios.
"""
import copy
import random
import statistics
import sys
import time

sys.path.insert(0, str(__import__("pathlib").Path(__file__).resolve().parent))
import torch

torch.set_num_threads(1)
import peft
from model_bench import batch, load

import lorakit

torch.manual_seed(0)
base = load("minilm")
lorakit.quantize(base, "nf4"); base.is_loaded_in_4bit = True
models = {"lorakit": lorakit.inject(copy.deepcopy(base), lorakit.LoraConfig(r=8, alpha=16, targets="all-linear",
                                                                             modules_to_save=["classifier"])),
          "peft": peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(r=8, lora_alpha=16, target_modules="all-linear",
                                                                           modules_to_save=["classifier"], task_type="SEQ_CLS"))}
b = batch("minilm", 0)
for k, m in models.items():
    m.train()
    print(k, "trainable", sum(p.numel() for p in m.parameters() if p.requires_grad))
    m(**b).loss.backward()
from torch.profiler import ProfilerActivity, profile

for k, m in models.items():
    m.zero_grad(set_to_none=True)
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        m(**b).loss.backward()
    print("=====", k)
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=18))
times = {k: [] for k in models}
for i in range(5):
    order = list(models); random.shuffle(order)
    for k in order:
        m = models[k]; m.zero_grad(set_to_none=True)
        t0 = time.perf_counter(); m(**b).loss.backward(); times[k].append(time.perf_counter() - t0)
print({k: statistics.median(v) for k, v in times.items()}, statistics.median([a / b for a, b in zip(times["lorakit"], times["peft"])]))

"""The first training step of a fused model with a cold measured-dispatch cache (every call
site timing its candidates) against the warm steps after it, channels_last, fp32, SGD.

    python benchmarks/bench_cold_step.py resnet50 8 224 0 benchmarks/results/cold_step_cpu_resnet50_224.json

Arguments: model, batch, image size, small-input stem (1/0), output JSON. The cache directory is
a fresh temporary one.
"""
import json, os, sys, tempfile, time
os.environ["RESNET_FAST_CACHE_DIR"] = tempfile.mkdtemp()
import torch, torch.nn.functional as F
import resnet_fast
from resnet_fast import models
from resnet_fast.timing import provenance
arch, batch, size, small = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4] == "1"
torch.manual_seed(0)
m = getattr(models, arch)(small_input=small, num_classes=10).to(memory_format=torch.channels_last)
opt = torch.optim.SGD(m.parameters(), lr=0.01, momentum=0.9)
x = torch.randn(batch, 3, size, size).to(memory_format=torch.channels_last)
y = torch.randint(0, 10, (batch,))
def step():
    t = time.perf_counter()
    F.cross_entropy(m(x), y).backward(); opt.step(); opt.zero_grad(set_to_none=True)
    return time.perf_counter() - t
cold = step()
warm = [step() for _ in range(3)]
out = dict(provenance=provenance(torch.device("cpu"), 0, 3), model=arch, batch=batch, size=size,
           small_input=small, cold_step_s=cold, warm_steps_s=warm, ratio=cold / min(warm))
print(json.dumps({k: v for k, v in out.items() if k != "provenance"}))
json.dump(out, open(sys.argv[5], "w"), indent=1)

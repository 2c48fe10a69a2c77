"""Benchmark of whole ResNets: a training step and eval, fused vs eager vs torch.compile.

The measuring code is :mod:`resnet_fast.model_bench` (also ``python -m resnet_fast bench``, with
the same options); see its documentation for the providers, modes, timing and outputs.

    python benchmarks/bench_model.py                    # CPU: ResNet-18 and -50, batch 32, 64x64
    python benchmarks/bench_model.py --device cuda      # bf16, batch 256, 224x224
    python benchmarks/bench_model.py --quick            # about a minute on 2 CPU cores
"""

import sys

from resnet_fast.model_bench import main

if __name__ == "__main__":
    sys.exit(main())

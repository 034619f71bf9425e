"""``python -m modula_ray.train.deepspeed_ops``: build, once, the DeepSpeed op that CPU workers load.

On the CPU accelerator every ``deepspeed.initialize`` loads the shared-memory all-reduce op
(``deepspeed_shm_comm``), compiled on first use: about 50 s on 2 cores, inside the first ZeRO
fit. ``make install`` builds it into the cache that Train workers use (``TORCH_EXTENSIONS_DIR`` =
``$MODULA_RAY_CACHE/torch_extensions``), as ``DS_BUILD_OPS=1`` would at a DeepSpeed install.
On CUDA there is nothing to do here. (Fused Adam is not built on CPU at all: ``engine.py`` asks
DeepSpeed for torch's AdamW there.)
"""
from __future__ import annotations

import os
import sys
import time

from ..models import cache_dir

OPS = ["ShareMemCommBuilder"]


def extensions_dir():
    return cache_dir() / "torch_extensions"


def build() -> list[str]:
    """Load (compiling when not cached) each op that this machine's accelerator uses; their names."""
    os.environ.setdefault("TORCH_EXTENSIONS_DIR", str(extensions_dir()))
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    import deepspeed.ops
    from deepspeed.accelerator import get_accelerator

    built = []
    for name in OPS:
        builder = get_accelerator().create_op_builder(name)
        if builder is None or not deepspeed.ops.__compatible_ops__.get(builder.NAME, False):
            continue
        builder.load(verbose=False)
        built.append(builder.NAME)
    return built


def main() -> int:
    start = time.perf_counter()
    built = build()
    print(f"DeepSpeed ops ready in {os.environ['TORCH_EXTENSIONS_DIR']}: {', '.join(built) or 'none needed'} "
          f"({time.perf_counter() - start:.0f} s)", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())

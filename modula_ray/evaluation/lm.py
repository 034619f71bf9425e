"""The lm-eval model ``modula``: lm-eval's own ``HFLM`` over a composition or a base model.

    lm_eval --model modula --model_args run=RUN_DIR --include_path eval/tasks --tasks modula_math
    lm_eval --model modula --model_args base=smollm2-135m,data_dir=DATA_DIR ...

``run=`` loads the composition with ``modula_ray.compose.load_composition`` (every method: lora,
molora, modula_flan, modula_res; lineage and base model checked) and ``base=`` a registered base
model alone; everything else (loglikelihood, rolling loglikelihood, ``generate_until``, batching,
chat templates) is ``HFLM``'s code. Other ``--model_args`` (``batch_size``, ``max_length``, ...)
go to ``HFLM``. ``data_dir`` (default: the run's own data folder) is where ``eval/tasks`` read
their test splits; it travels with the model (``ModulaLM.data_dir``, which ``evaluate_model``
passes on) and, on lm-eval's command line, with the model arguments, which lm-eval hands every
task as metadata.
"""
from __future__ import annotations

from lm_eval.api.registry import register_model
from lm_eval.models.huggingface import HFLM

from ..errors import ConfigError
from .tasks import data_dir_of


@register_model("modula")
class ModulaLM(HFLM):
    """``HFLM`` handed the model from ``load_composition(run)`` or ``load_base(base)``."""

    def __init__(self, run: str | None = None, base: str | None = None, dtype: str = "float32",
                 data_dir: str | None = None, **kwargs):
        from ..compose import load_composition
        from ..models import load_base

        if (run is None) == (base is None):
            raise ConfigError("model_args", "give exactly one of run=RUN_DIR (a composition) or base=NAME "
                                            "(a base model alone)")
        if run is not None:
            model, tokenizer = load_composition(run, dtype=dtype)
            data_dir = data_dir or data_dir_of(run)
        else:
            model, tokenizer = load_base(base, dtype=dtype)
        for ignored in ("pretrained", "tokenizer", "device", "parallelize"):
            kwargs.pop(ignored, None)  # the model is already built, on its own device
        super().__init__(pretrained=model, tokenizer=tokenizer, **kwargs)
        self.run, self.base, self.data_dir = run, base, data_dir

"""Export a LoRA-shaped expert as a standard PEFT adapter folder.

The universal expert (and flan/molora domain experts, which read ``x``) are plain LoRA
pairs, so ``peft.PeftModel.from_pretrained(base, folder)`` reproduces them exactly:
peft computes ``W0 x + (alpha / r) B A x`` with ``lora_A.weight = A``, ``lora_B.weight = B``.
Which parts qualify is the method's ``peft_parts``: res domain experts read ``h`` through a
LeakyReLU and routers are not adapters, so neither has a PEFT equivalent.
"""
from __future__ import annotations

from pathlib import Path

from .inject import spec_of
from .serialization import part_config, part_tensors


PEFT_NAMES = {"A": "lora_A", "B": "lora_B"}


def export_peft(model, out_dir, *, part: str = "universal", domain: str | None = None,
                base_model_name_or_path: str | None = None) -> Path:
    from peft import LoraConfig
    from safetensors.torch import save_file

    from ..fileio import atomic_dir

    spec = spec_of(model)
    if part not in spec.method_class.peft_parts:
        raise ValueError(f"part: the {part!r} part of {spec.method!r} is not a LoRA pair (exportable: "
                         f"{list(spec.method_class.peft_parts)})")
    config = part_config(model, part, domain)
    tensors = {}
    for key, tensor in part_tensors(model, part, domain).items():
        path, name = key.rsplit(".", 1)
        tensors[f"base_model.model.{path}.{PEFT_NAMES[name]}.weight"] = tensor.detach().to("cpu").contiguous()
    lora_config = LoraConfig(r=config["rank"], lora_alpha=config["alpha"], target_modules=list(spec.target_modules),
                             lora_dropout=float(spec.config.dropout), bias="none", task_type="CAUSAL_LM",
                             base_model_name_or_path=base_model_name_or_path)
    out_dir = Path(out_dir)
    with atomic_dir(out_dir) as tmp:
        lora_config.save_pretrained(str(tmp))
        save_file(tensors, str(tmp / "adapter_model.safetensors"))
    return out_dir

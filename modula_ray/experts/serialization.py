"""Save and load one part of a composition: the universal expert, one domain expert, or the routers.

A part is a folder ``adapter.safetensors`` + ``config.json``. Tensor keys are the wrapped
module paths of the base model plus the parameter name, e.g.
``model.layers.0.self_attn.q_proj.A`` (experts) or ``...q_proj.weight`` (router).
Writes are atomic. Loading checks the file hash, keys, shapes, dtypes and the
hyperparameters that shape the maths, and raises ``ArtifactError`` naming the file.
"""
from __future__ import annotations

from pathlib import Path

import torch

from ..errors import ArtifactError
from ..fileio import atomic_dir, atomic_write_json, read_json, sha256_file
from .contract import PARTS
from .inject import expert_layers, spec_of
from .placement import block_routers

TENSORS_FILE = "adapter.safetensors"
CONFIG_FILE = "config.json"
FORMAT = "modula-ray/part"
FORMAT_VERSION = 1
ADDED_LATER = {"placement": "layer"}  # config keys parts saved before they existed read as this


def _domain_index(model, domain: str | None) -> int:
    domains = spec_of(model).domains
    if domain not in domains:
        raise ValueError(f"domain: {domain!r} is not one of the model's domains {domains}")
    return domains.index(domain)


def part_tensors(model, part: str, domain: str | None = None) -> dict[str, torch.Tensor]:
    """The live tensors of ``part`` keyed as in the saved file (views, not copies). Which tensors a
    part holds is the method's business (``ExpertLinear.part_tensors``); keys are module path + name."""
    if part not in PARTS:
        raise ValueError(f"part must be one of {PARTS}, got {part!r}")
    index = _domain_index(model, domain) if part == "domain" else None
    layers = expert_layers(model).items()
    if part == "router":  # one per layer (``...q_proj.weight``) or one per block (``...layers.3.router.weight``)
        holders = {path: layer.router for path, layer in layers if layer.router is not None} | block_routers(model)
        if not holders:
            raise ValueError(f"part: method {spec_of(model).method!r} has no 'router' part")
        return {f"{path}.{name}": t for path, holder in holders.items() for name, t in holder.named_parameters()}
    return {f"{path}.{name}": tensor for path, layer in layers for name, tensor in layer.part_tensors(part, index).items()}


def tensors_sha256(tensors: dict[str, torch.Tensor]) -> str:
    """One digest of named tensors (names, dtypes, shapes and bytes, in name order): compares live
    weights with a saved part without trusting either file."""
    import hashlib

    digest = hashlib.sha256()
    for key in sorted(tensors):
        tensor = tensors[key].detach().to("cpu").contiguous()
        digest.update(f"{key}:{tensor.dtype}:{tuple(tensor.shape)}".encode())
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes() if tensor.numel() else b"")
    return digest.hexdigest()


def part_config(model, part: str, domain: str | None = None) -> dict:
    """Hyperparameters that must match for the part to load into another model."""
    spec = spec_of(model)
    layer = next(iter(expert_layers(model).values()))
    config = {"format": FORMAT, "format_version": FORMAT_VERSION, "part": part, "method": spec.method,
              "target_modules": list(spec.target_modules)}
    if part == "domain":
        config["domain"] = domain
    if part == "router":
        config["routed"] = spec.routed_names()
    config.update(layer.part_hparams(part))
    return config


def save_part(model, part: str, out_dir, *, domain: str | None = None, metadata: dict | None = None) -> Path:
    """Write ``part`` (``domain`` names which expert) to ``out_dir`` atomically; returns the folder."""
    from safetensors.torch import save_file

    tensors = {key: t.detach().to("cpu").contiguous() for key, t in part_tensors(model, part, domain).items()}
    config = part_config(model, part, domain)
    config["dtype"] = str(next(iter(tensors.values())).dtype).removeprefix("torch.")
    config["metadata"] = dict(metadata or {})
    out_dir = Path(out_dir)
    with atomic_dir(out_dir) as tmp:
        save_file(tensors, str(tmp / TENSORS_FILE))
        config["sha256"] = sha256_file(tmp / TENSORS_FILE)
        atomic_write_json(tmp / CONFIG_FILE, config)
    return out_dir


def read_part(path) -> tuple[dict, dict[str, torch.Tensor]]:
    """Read and integrity-check a part folder: ``(config, tensors)``."""
    from safetensors.torch import load_file

    path = Path(path)
    config = read_json(path / CONFIG_FILE)
    if not isinstance(config, dict) or config.get("format") != FORMAT:
        raise ArtifactError(path / CONFIG_FILE, f"not a modula-ray part (format {config.get('format')!r})"
                            if isinstance(config, dict) else "not a JSON object")
    if config.get("format_version") != FORMAT_VERSION:
        raise ArtifactError(path / CONFIG_FILE, f"format_version {config.get('format_version')!r} is not "
                                                f"{FORMAT_VERSION}")
    file = path / TENSORS_FILE
    if not file.is_file():
        raise ArtifactError(file, "file not found")
    digest = sha256_file(file)
    if digest != config.get("sha256"):
        raise ArtifactError(file, f"sha256 {digest[:12]}... does not match config.json "
                                  f"({str(config.get('sha256'))[:12]}...): the file is truncated or was changed")
    try:
        tensors = load_file(str(file))
    except Exception as exc:  # safetensors raises several types for corrupt headers
        raise ArtifactError(file, f"cannot read safetensors ({exc})") from None
    dtype = getattr(torch, str(config.get("dtype")), None)
    for key, tensor in tensors.items():
        if tensor.dtype != dtype:
            raise ArtifactError(file, f"tensor {key!r} has dtype {tensor.dtype}, config.json says {config.get('dtype')}")
    return config, tensors


def _check_config(file, saved: dict, wanted: dict) -> None:
    compared = [k for k in wanted if k not in ("format", "format_version")]
    if saved["part"] == "universal":
        compared.remove("method")  # a universal expert is a plain LoRA, shared by lora/flan/res
    for key in compared:
        if saved.get(key, ADDED_LATER.get(key)) != wanted[key]:
            raise ArtifactError(file, f"{key} is {saved.get(key, ADDED_LATER.get(key))!r} in the file but "
                                      f"{wanted[key]!r} in the model")


def load_part(model, part: str, path, *, domain: str | None = None) -> dict:
    """Copy a saved part into ``model`` in place after strict checks; returns its config."""
    path = Path(path)
    config, tensors = read_part(path)
    _check_config(path / CONFIG_FILE, config, part_config(model, part, domain))
    targets = part_tensors(model, part, domain)
    file = path / TENSORS_FILE
    missing, unexpected = sorted(set(targets) - set(tensors)), sorted(set(tensors) - set(targets))
    if missing or unexpected:
        raise ArtifactError(file, f"keys do not match the model: missing {missing[:3]}{'...' if len(missing) > 3 else ''}"
                                  f" unexpected {unexpected[:3]}{'...' if len(unexpected) > 3 else ''}")
    for key, target in targets.items():
        if tuple(tensors[key].shape) != tuple(target.shape):
            raise ArtifactError(file, f"tensor {key!r} has shape {tuple(tensors[key].shape)}, "
                                      f"the model needs {tuple(target.shape)}")
    with torch.no_grad():
        for key, target in targets.items():
            target.copy_(tensors[key])
    return config

"""Helpers shared by tests."""
from pathlib import Path

import torch

TINY_CONFIG = Path(__file__).resolve().parents[1] / "jobs" / "configs" / "tiny.yaml"


def randomise_experts(model, seed=0, scale=0.05):
    """Give every expert and router parameter random values, so no term hides behind zero init."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if any(part in name for part in (".universal.", ".domain.", ".router.")):
                p.copy_(torch.randn(p.shape, generator=g) * scale)


def ids(tokenizer, text="the patient takes 12 + 7 = 19 doses"):
    return tokenizer(text, return_tensors="pt").input_ids


def assert_same_gradients(fast, slow, rtol=1e-5, atol=1e-5) -> int:
    """Pairs of ``(name, parameter)`` from a fast path and its reference got the same gradients (or
    none on both sides); returns how many had one."""
    checked = 0
    for (name, p_fast), (_, p_slow) in zip(fast, slow):
        assert (p_fast.grad is None) == (p_slow.grad is None), name
        if p_fast.grad is not None:
            torch.testing.assert_close(p_fast.grad, p_slow.grad, rtol=rtol, atol=atol, msg=name)
            checked += 1
    return checked


def modula_model(base, config, seed: int = 1):
    """A copy of the tiny ``base`` model with ``config``'s MoDULA experts injected, random (``seed``)."""
    import copy

    from modula_ray.experts import inject

    model = copy.deepcopy(base)
    inject(model, config.method, config.domains, universal_rank=8, domain_rank=4)
    randomise_experts(model, seed=seed)
    return model


def saved_run(run_dir, model, config):
    """A run folder as the pipeline leaves it for ``config`` (a MoDULA method), without Ray: a data
    index, the universal, one expert per domain (trained over that universal) and the router of
    ``model`` (injected for ``config``), and the saved ``Manifest`` that records them."""
    from modula_ray.compose import Manifest, part_sha256
    from modula_ray.config import to_dict
    from modula_ray.experts import save_part
    from modula_ray.fileio import atomic_write_json

    domains = config.domains + [config.data.general_domain]
    atomic_write_json(run_dir / "data" / "datasets.json", {"schema_version": 1, "size": "tiny", "seed": 0, "domains": {
        d: {"splits": {"train": {"sha256": f"{i:064x}"}}} for i, d in enumerate(domains, 1)}})
    manifest = Manifest.create(run_dir, method=config.method, experts=to_dict(config.experts),
                               base_model={"name": config.base_model, "path": str(run_dir / "base"), "sha256": "0" * 64})
    manifest.record_data(run_dir / "data")
    universal = save_part(model, "universal", run_dir / "universal")
    manifest.record_universal(universal, {"loss": 6.0})
    for domain in config.domains:
        manifest.record_domain(domain, save_part(model, "domain", run_dir / "experts" / domain, domain=domain,
                                                 metadata={"universal_sha256": part_sha256(universal)}), {"loss": 5.0})
    manifest.record_router(save_part(model, "router", run_dir / "router"), metrics={"loss": 4.0},
                           routed=config.method_class.routed_names(config.domains), hyperparameters={"lr": 0.01})
    manifest.save()
    return manifest


def compositions_over_one_base(specs=(("modula_res", ["math", "code", "medicine"]),
                                      ("modula_flan", ["math", "code", "medicine", "finance"]),
                                      ("lora", ["all"]))):
    """The tiny base and one composition per ``(method, domains)`` over its very weights (as
    ``load_base(share=True)`` gives them), random experts, each in serving form."""
    import copy

    from modula_ray.experts import inject, method_class, set_stage
    from modula_ray.experts.serving import serving_form
    from modula_ray.models import tiny_model

    base, tokenizer = tiny_model()
    models = []
    for seed, (method, domains) in enumerate(specs):
        model = copy.deepcopy(base, memo={id(p): p for p in base.parameters()})
        inject(model, method, domains, universal_rank=4, domain_rank=2)
        randomise_experts(model, seed=seed + 1, scale=0.3)
        set_stage(model, method_class(method).inference_stage)
        models.append(serving_form(model.eval()))
    return base.eval(), tokenizer, models

"""Why does the router (not) learn? Stage 3 of a finished run, retrained here without Ray, step by step.

    python benchmarks/router_diagnosis.py runs/diag --steps 40 --coefs 0 1 --out docs/results/router-diagnosis.json

For each ``route_loss_coef`` in ``--coefs`` the run's router stage starts again from its zero
init (the same task the pipeline builds: ``train/stages/router.py``, through the loop's Ray-free
``setup``/``train_step``) and reports at every step:

- ``ce``, ``route`` (the supervised term; 0 when its coefficient is), ``gate_entropy`` (1 =
  uniform), the gradient norm reaching the routers before clipping, the routers' weight norm;
- every ``--eval-every`` steps, on the domain tokens of ``--rows`` val rows per domain (prompt
  body and response): routing accuracy per token and per sequence (``evaluation/routing.py``)
  and the mean ``-log P(own expert)``.

Once, before training: the size of what routing can change. Per expert layer and expert, over
the val rows, ``|delta_i(x)| / |W0 x|`` with the router forced to expert ``i``, and the spread
between experts ``|delta_i - delta_j| / |W0 x|``; the share of each row's tokens that the chat
template's shared head takes (what the router sees that carries no domain). The run folder is only
read; the JSON holds everything.
"""
from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def run_context(run_dir: Path, overrides: list[str]):
    from modula_ray.compose import RUN_CONFIG, Manifest
    from modula_ray.config import PipelineConfig, load_config
    from modula_ray.models import resolve_base
    from modula_ray.train.task import RunContext

    manifest = Manifest.read(run_dir)
    config = load_config(PipelineConfig, run_dir / RUN_CONFIG, overrides)
    return RunContext(config=config, run_dir=str(run_dir), data_dir=manifest["data"]["dir"],
                      base_model=resolve_base(config.base_model), base_sha256=manifest["base_model"]["sha256"],
                      run_id=manifest["run_id"], domains=list(manifest["domains"])), manifest


def val_rows(data_dir: str, domains: list[str], rows: int) -> dict[str, list[dict]]:
    from modula_ray.data.build import split_file
    from modula_ray.data.schema import read_split

    return {d: read_split(split_file(data_dir, d, "val")).select(["prompt", "response"]).to_pylist()[:rows]
            for d in domains}


def routing_on_domain_tokens(model, tokenizer, rows: dict, targets: dict, max_length: int, head: int) -> dict:
    """``{domain: {token_accuracy, sequence_accuracy, route_nll}}`` for the domains with a target."""
    from modula_ray.evaluation.routing import captured_gates, domain_token_routing

    with torch.no_grad(), captured_gates(model) as captured:
        return {domain: domain_token_routing(model, tokenizer, items, targets[domain], max_length, head, captured)
                for domain, items in rows.items() if domain in targets}


def expert_sizes(model, tokenizer, rows: dict, max_length: int) -> dict:
    """Mean over expert layers of ``|delta_i x| / |W0 x|`` per expert, and of the spread between experts."""
    from modula_ray.data.formatting import encode_example
    from modula_ray.evaluation.specialisation import forced_expert
    from modula_ray.experts import expert_layers, spec_of

    names, layers = spec_of(model).routed_names(), expert_layers(model)
    inputs: dict[str, list] = {}
    hooks = [layer.register_forward_hook(lambda m, args, out, path=path: inputs.setdefault(path, []).append(args[0]))
             for path, layer in layers.items()]
    with torch.no_grad():
        for items in rows.values():
            for row in items[:4]:
                model(torch.tensor([encode_example(tokenizer, row["prompt"], row["response"], max_length).input_ids]),
                      logits_to_keep=1, use_cache=False)
    for hook in hooks:
        hook.remove()
    size = {name: [] for name in names}
    spread = []
    with torch.no_grad():
        for path, layer in layers.items():
            x = torch.cat([a.reshape(-1, a.shape[-1]) for a in inputs[path]])
            base = torch.nn.functional.linear(x, layer.base.weight, layer.base.bias).norm(dim=-1).mean()
            deltas = []
            for index, name in enumerate(names):
                with forced_expert(model, index):
                    deltas.append(layer.delta(x))
                size[name].append(float(deltas[-1].norm(dim=-1).mean() / base))
            spread += [float((deltas[i] - deltas[j]).norm(dim=-1).mean() / base)
                       for i in range(len(deltas)) for j in range(i + 1, len(deltas))]
    return {"delta_over_base": {n: statistics.mean(v) for n, v in size.items()},
            "spread_over_base": statistics.mean(spread), "layers": len(layers)}


def diagnose(run_dir: Path, coef: float, args) -> dict:
    from modula_ray.data.formatting import shared_head_length
    from modula_ray.data.ray_data import read_domains
    from modula_ray.experts import method_class
    from modula_ray.experts.inject import routers
    from modula_ray.train.loop import setup, train_step
    from modula_ray.train.stages import router as router_stage

    overrides = [f"stages.router.route_loss_coef={coef}", f"stages.router.steps={args.steps}", *args.set]
    run, manifest = run_context(run_dir, overrides)
    task = router_stage.tasks(run, run.domains)[0]
    task.log_to_files, task.tensorboard_dir = False, None
    table = read_domains(task.data_dir, task.data_domains, "train", task.data_weights, seed=task.seed)
    state = setup(task, sorted(table.select(["id", "domain", "prompt", "response"]).to_pylist(), key=lambda r: r["id"]))
    model, tokenizer = state.engine.module, state.tokenizer
    head = shared_head_length(tokenizer)
    targets = method_class(task.method).route_labels(task.domains, task.data_domains)
    rows = val_rows(task.data_dir, task.data_domains, args.rows)
    record = {"coef": coef, "overrides": list(args.set),
              "hparams": {k: task.hparams[k] for k in ("lr", "steps", "batch_size", "aux_loss_coef")},
              "temperature": run.config.experts.temperature, "router_placement": run.config.experts.router_placement,
              "routers": len(routers(model)), "steps": [], "routing": {}}
    model.eval()
    record["routing"][0] = routing_on_domain_tokens(model, tokenizer, rows, targets, task.max_length, head)
    if args.sizes:
        record["sizes"] = expert_sizes(model, tokenizer, rows, task.max_length)
    model.train()
    finish_step, grad_norms = state.engine.finish_step, []

    def measured_finish_step():
        grad_norms.append(float(torch.norm(torch.stack([p.grad.norm() for p in state.params.values()
                                                        if p.grad is not None]))))
        finish_step()

    state.engine.finish_step = measured_finish_step
    started = time.perf_counter()
    for step in range(1, args.steps + 1):
        window_before = (state.window.loss, state.window.route, state.window.entropy, state.window.micro_batches)
        train_step(state)
        n = state.window.micro_batches - window_before[3]
        with torch.no_grad():
            weight_norm = float(torch.norm(torch.stack([p.norm() for p in state.params.values()])))
        entry = {"step": step, "ce": (state.window.loss - window_before[0]) / n,
                 "route": (state.window.route - window_before[1]) / n,
                 "gate_entropy": (state.window.entropy - window_before[2]) / n, "router_grad_norm": grad_norms[-1],
                 "router_weight_norm": weight_norm}
        record["steps"].append(entry)
        if step % args.eval_every == 0 or step == args.steps:
            model.eval()
            record["routing"][step] = routing_on_domain_tokens(model, tokenizer, rows, targets, task.max_length, head)
            model.train()
        print(f"coef {coef} step {step}: " + " ".join(f"{k} {v:.4f}" for k, v in entry.items()
                                                      if isinstance(v, float)), flush=True)
    record["train_s"] = time.perf_counter() - started
    record["route_init"] = state.route_init  # route_init_rows: the fit before step 1 (router_fit.py)
    record["head_tokens"] = head
    record["head_share"] = statistics.mean(head / len(e.input_ids) for e in state.examples)
    record["examples"], record["encode"] = len(state.examples), state.stats.summary()
    return record


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run", type=Path, help="a finished MoDULA run folder (read only)")
    parser.add_argument("--coefs", type=float, nargs="+", default=[0.0, 1.0], help="route_loss_coef values")
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--rows", type=int, default=16, help="val rows per domain for routing accuracy")
    parser.add_argument("--eval-every", type=int, default=10)
    parser.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE",
                        help="config overrides, e.g. stages.router.lr=0.05 experts.temperature=0.5")
    parser.add_argument("--sizes", action=argparse.BooleanOptionalAction, default=True,
                        help="measure the experts' output sizes before training")
    parser.add_argument("--out", type=Path, default=None, help="write the JSON here")
    args = parser.parse_args(argv)
    torch.manual_seed(0)
    result = {"run": str(args.run), "machine": {"cpu_count": __import__("os").cpu_count(),
                                                "platform": platform.platform(), "torch": torch.__version__},
              "runs": [diagnose(args.run.resolve(), coef, args) for coef in args.coefs]}
    text = json.dumps(result, indent=2)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text + "\n")
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())

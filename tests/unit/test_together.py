"""Stage 2 trained together (``stages.experts.together``, train/together.py): the same training as
a worker group per expert, held to groups of one run side by side through the loop's own
setup/train_step; its pieces against plain references; the config's checks."""
import pytest
import torch

from modula_ray.config import PipelineConfig, StageConfig, load_config, to_dict
from modula_ray.errors import ConfigError
from modula_ray.experts.serialization import read_part, save_part
from modula_ray.train.loop import finish, setup, train_step, window_metrics
from modula_ray.train.schedule import BatchSchedule
from modula_ray.train.task import PartRef, StageTask
from modula_ray.train.together import GroupSchedule, clip_per_expert
from tests.unit.test_train_parts import ROOT

EXPERTS = {"target_modules": ["q_proj", "v_proj"], "universal_rank": 4, "domain_rank": 2, "universal_alpha": 8.0,
           "domain_alpha": 4.0}
DOMAINS = ["math", "code"]
ROWS = [{"id": f"{d}{i:03d}", "domain": d, "prompt": f"{d}: what is {i} + {i * 3 % 97}?",
         "response": f"{i + i * 3 % 97}" * (1 + i % 3)} for d in DOMAINS for i in range(10)]
# clipping at 0.05 and weight decay both act, so each expert's own norm and elementwise AdamW are tested
HPARAMS = to_dict(StageConfig(steps=3, batch_size=2, lr=0.05, max_grad_norm=0.05, weight_decay=0.01, log_every=3,
                              checkpoint_every=3))


def task(tmp_path, method, key, domains, load) -> StageTask:
    return StageTask(key=key, stage="experts", method=method, domains=domains, base_model="tiny-llama",
                     experts=EXPERTS, data_dir=str(tmp_path), data_domains=domains, hparams=HPARAMS,
                     run_dir=str(tmp_path), log_to_files=False, load=load, metadata={"run_id": "unit"},
                     save=[PartRef("domain", str(tmp_path / "experts" / d), d) for d in domains])


def universal_part(tmp_path) -> list[PartRef]:
    """A universal expert away from its init (B = 0 would hide res's refinement path)."""
    state = setup(StageTask(key="universal", stage="universal", method="modula_res", domains=["math"],
                            base_model="tiny-llama", experts=EXPERTS, data_dir=str(tmp_path), data_domains=["math"],
                            hparams=HPARAMS, run_dir=str(tmp_path), log_to_files=False), ROWS)
    torch.manual_seed(1)
    with torch.no_grad():
        for parameter in state.params.values():
            parameter.normal_(0, 0.1)
    save_part(state.engine.module, "universal", tmp_path / "universal")
    return [PartRef("universal", str(tmp_path / "universal"))]


@pytest.mark.parametrize("method, atol", [("modula_res", 1e-6), ("modula_flan", 1e-5)])
def test_together_trains_each_expert_as_its_own_group_would(tmp_path, method, atol):
    load = universal_part(tmp_path) if method == "modula_res" else []
    together = setup(task(tmp_path, method, "experts", DOMAINS, load), ROWS)
    start = {name: p.detach().clone() for name, p in together.params.items()}
    alone = {}
    for i, domain in enumerate(DOMAINS):  # a group of one, from the same initial expert
        state = alone[domain] = setup(task(tmp_path / domain, method, f"experts/{domain}", [domain], load),
                                      [r for r in ROWS if r["domain"] == domain])
        assert list(state.params) == list(start)
        with torch.no_grad():
            for name, parameter in state.params.items():
                parameter.copy_(start[name][i:i + 1])
    for _ in range(3):
        train_step(together)
        for state in alone.values():
            train_step(state)
    metrics = window_metrics(together)
    assert (metrics["aux"], metrics["gate_entropy"]) == (0.0, 0.0)  # no router trains in stage 2
    for i, domain in enumerate(DOMAINS):
        mine = alone[domain]
        for name, parameter in together.params.items():
            assert (parameter[i] - start[name][i]).abs().max() > 1e-3, "the expert did not move"
            torch.testing.assert_close(parameter[i], mine.params[name][0], atol=atol, rtol=0)
        assert metrics[f"loss/{domain}"] == pytest.approx(window_metrics(mine)["loss"], rel=1e-5)
    assert together.counters["tokens"] == sum(s.counters["tokens"] for s in alone.values())
    final = finish(together, "node")
    assert set(final["domains"]) == set(DOMAINS) and final["domains"]["code"]["examples"] == 10
    assert final["domains"]["math"]["tokens"] == alone["math"].counters["tokens"]
    for domain in DOMAINS:  # each domain's saved part is the one its own group saves
        finish(alone[domain], "node")
        config, tensors = read_part(tmp_path / "experts" / domain)
        own_config, own = read_part(tmp_path / domain / "experts" / domain)
        assert {k: v for k, v in config.items() if k != "sha256"} == {k: v for k, v in own_config.items()
                                                                       if k != "sha256"}
        for name, tensor in tensors.items():
            torch.testing.assert_close(tensor, own[name], atol=atol, rtol=0)


def test_a_step_takes_each_domains_own_micro_batch():
    schedule = GroupSchedule([5, 3], world=1, rank=0, batch_size=2, grad_accum=1, seed=7)
    own = [BatchSchedule(n, world=1, rank=0, batch_size=2, grad_accum=1, seed=7) for n in (5, 3)]
    for step in range(4):
        assert schedule.groups(step, 0) == [own[0].indices(step, 0), [5 + i for i in own[1].indices(step, 0)]]


def test_clip_per_expert_is_torchs_clip_on_each_expert_alone():
    torch.manual_seed(0)
    params = [torch.nn.Parameter(torch.zeros(3, 4, 5)), torch.nn.Parameter(torch.zeros(3, 6))]
    for p in params:
        p.grad = torch.randn_like(p) * torch.tensor([0.01, 1.0, 5.0]).view(-1, *[1] * (p.dim() - 1))
    expected = []
    for i in range(3):
        alone = [torch.nn.Parameter(p[i].detach().clone()) for p in params]
        for a, p in zip(alone, params):
            a.grad = p.grad[i].clone()
        torch.nn.utils.clip_grad_norm_(alone, 0.5)
        expected.append([a.grad for a in alone])
    clip_per_expert(params, 0.5)
    for i in range(3):
        for p, reference in zip(params, expected[i]):
            torch.testing.assert_close(p.grad[i], reference)
    assert params[0].grad[0].abs().max() < 0.1  # the small expert was not scaled up


@pytest.mark.parametrize("overrides, message", [
    (["method=mode", "experts.mode_blocks=[[0, 1], [1, 2]]"], "trains whole layers"),
    (["method=molora"], "has no stage 2"),
    (["stages.experts.domains.math.lr=0.1"], "drop stages.experts.domains"),
    (["stages.experts.deepspeed={zero_stage: 2}"], "drop deepspeed"),
])
def test_together_is_refused_where_it_cannot_be_the_same_training(overrides, message):
    with pytest.raises(ConfigError, match=f"stages.experts.together.*{message}"):
        load_config(PipelineConfig, ROOT / "jobs/configs/tiny.yaml", ["stages.experts.together=true", *overrides])


def test_together_plans_one_group_and_records_every_domain(tmp_path):
    from modula_ray.train.pipeline import plan_groups
    from modula_ray.train.stages import experts
    from modula_ray.train.task import RunContext

    config = load_config(PipelineConfig, ROOT / "jobs/configs/tiny.yaml", ["stages.experts.together=true"])
    assert [name for name, _ in plan_groups(config)] == ["universal", "experts", "router"]
    run = RunContext(config=config, run_dir=str(tmp_path), data_dir=str(tmp_path), base_model="/m",
                     base_sha256="x", run_id="r", domains=DOMAINS)
    (tmp_path / "universal").mkdir()
    (tmp_path / "universal" / "config.json").write_text('{"sha256": "abc"}')
    [one] = experts.tasks(run, DOMAINS)
    assert (one.key, one.domains, one.stage_keys) == ("experts", DOMAINS, ["experts/math", "experts/code"])
    assert [ref.domain for ref in one.save] == DOMAINS and one.metadata["universal_sha256"] == "abc"
    [added] = experts.tasks(run, ["finance"])  # add-domain trains one expert: a group of one
    assert (added.key, added.stage_keys) == ("experts/finance", ["experts/finance"])

"""Ray Data as the product uses it: the Parquet splits mixed by weight, handed unsplit to real Ray
Train workers (``DataConfig(datasets_to_split=[])``, as ``train.launcher`` does), read by the loop's
own reader; each rank then takes its disjoint part of every global batch from ``BatchSchedule``."""
import json
import sys
import tempfile

import pytest

from modula_ray.data.ray_data import mixed_ray_dataset, read_domains
from modula_ray.train.schedule import BatchSchedule

pytestmark = pytest.mark.slow
STEPS, BATCH = 3, 4


def shard_reader_loop(config):
    """Each worker reads the split as the training loop does and reports its ids and batches."""
    import ray.train
    from ray.train import Checkpoint

    from modula_ray.train.loop import _read_rows

    rows = _read_rows(ray.train.get_dataset_shard("train"))
    context = ray.train.get_context()
    rank, world = context.get_world_rank(), context.get_world_size()
    schedule = BatchSchedule(len(rows), world=world, rank=rank, batch_size=BATCH, grad_accum=1, seed=0)
    batches = [[rows[i]["id"] for i in schedule.indices(step, 0)] for step in range(STEPS)]
    with tempfile.TemporaryDirectory() as folder:
        with open(f"{folder}/rank{rank}.json", "w") as handle:
            json.dump({"ids": [r["id"] for r in rows], "batches": batches}, handle)
        ray.train.report({"rows": len(rows)}, checkpoint=Checkpoint.from_directory(folder))


def test_every_worker_reads_the_whole_mix_and_takes_its_own_part_of_each_batch(ray_local, tiny_data, tmp_path,
                                                                              run_name):
    import ray.cloudpickle
    from ray.train import DataConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])
    weights = {"math": 3, "code": 1}
    dataset = mixed_ray_dataset(tiny_data, ["math", "code"], "train", weights)
    # Fractional CPUs leave Ray Data headroom (it deadlocks when train workers claim every CPU).
    trainer = TorchTrainer(shard_reader_loop, datasets={"train": dataset},
                           dataset_config=DataConfig(datasets_to_split=[]),
                           scaling_config=ScalingConfig(num_workers=2, resources_per_worker={"CPU": 0.5}),
                           run_config=RunConfig(name=run_name, storage_path=str(tmp_path / "ray")))
    assert trainer.fit().error is None
    seen = {path.name: json.loads(path.read_text()) for path in (tmp_path / "ray" / run_name).rglob("rank*.json")}
    assert sorted(seen) == ["rank0.json", "rank1.json"]
    expected = read_domains(tiny_data, ["math", "code"], "train", weights)
    ids = sorted(expected.column("id").to_pylist())
    assert seen["rank0.json"]["ids"] == seen["rank1.json"]["ids"] == ids  # the whole mix, in one order
    domains = expected.column("domain").to_pylist()
    assert domains.count("math") == 3 * domains.count("code") > 0  # mixed 3:1 by weight
    whole = BatchSchedule(len(ids), world=2, rank=0, batch_size=BATCH, grad_accum=1, seed=0)
    for step in range(STEPS):
        first, second = seen["rank0.json"]["batches"][step], seen["rank1.json"]["batches"][step]
        assert len(first) == len(second) == BATCH and not set(first) & set(second)
        # the two ranks' parts are the global batch's positions, in order
        positions = range(step * whole.global_batch, (step + 1) * whole.global_batch)
        assert first + second == [ids[whole._at(p)] for p in positions]

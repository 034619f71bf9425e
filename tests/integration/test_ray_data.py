"""Ray Data: the Parquet splits, mixed by weight, read inside real Ray Train workers."""
import json
import sys
import tempfile

import pytest

from modula_ray.data.build import build_datasets
from modula_ray.data.ray_data import load_split, read_domains

pytestmark = pytest.mark.slow


def shard_reader_loop(config):
    """Each worker reads its shard and reports the ids it saw through a checkpoint."""
    import ray.train
    from ray.train import Checkpoint

    shard = ray.train.get_dataset_shard("train")
    ids, domains = [], []
    for batch in shard.iter_batches(batch_size=8, batch_format="pyarrow"):
        ids += batch.column("id").to_pylist()
        domains += batch.column("domain").to_pylist()
    rank = ray.train.get_context().get_world_rank()
    with tempfile.TemporaryDirectory() as folder:
        with open(f"{folder}/rank{rank}.json", "w") as handle:
            json.dump({"ids": ids, "domains": domains}, handle)
        ray.train.report({"rows": len(ids)}, checkpoint=Checkpoint.from_directory(folder))


def test_mixed_split_is_sharded_across_train_workers(ray_local, tmp_path, run_name):
    import ray.cloudpickle
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])
    build_datasets("tiny", 0, tmp_path / "data", domains=["math", "code"], progress=False)
    weights = {"math": 3, "code": 1}
    dataset = load_split(tmp_path / "data", ["math", "code"], "train", weights)
    # Fractional CPUs leave Ray Data headroom (it deadlocks when train workers claim every CPU).
    trainer = TorchTrainer(shard_reader_loop, datasets={"train": dataset},
                           scaling_config=ScalingConfig(num_workers=2, resources_per_worker={"CPU": 0.5}),
                           run_config=RunConfig(name=run_name, storage_path=str(tmp_path / "ray")))
    result = trainer.fit()
    assert result.error is None
    seen = {}
    for path in (tmp_path / "ray" / run_name).rglob("rank*.json"):
        seen[path.name] = json.loads(path.read_text())
    assert sorted(seen) == ["rank0.json", "rank1.json"]
    expected = read_domains(tmp_path / "data", ["math", "code"], "train", weights)
    all_ids = seen["rank0.json"]["ids"] + seen["rank1.json"]["ids"]
    assert sorted(all_ids) == sorted(expected.column("id").to_pylist())
    assert len(seen["rank0.json"]["ids"]) == len(seen["rank1.json"]["ids"]) == 32
    domains = seen["rank0.json"]["domains"] + seen["rank1.json"]["domains"]
    assert (domains.count("math"), domains.count("code")) == (48, 16)

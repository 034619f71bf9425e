"""train/schedule.py: the batches and the learning rate of step s, as pure functions of s."""
import pytest
import torch

from modula_ray.train.engine import lr_schedule
from modula_ray.train.schedule import BatchSchedule, lr_lambda

# lr_lambda(warmup, total)(s) for s = 0..total: (s + 1) / warmup, then 0.1 + 0.45 (1 + cos(pi (s - warmup) /
# (total - warmup))). transformers' cosine-with-min-lr schedulers differ whenever warmup > 0 (schedule.py).
PINNED_LR_FACTORS = {
    (10, 0): [1.0, 0.977975432333, 0.914057647469, 0.814503363532, 0.689057647469, 0.55, 0.410942352531,
              0.285496636468, 0.185942352531, 0.122024567667, 0.1],
    (10, 2): [0.5, 1.0, 1.0, 0.96574578963, 0.868198051534, 0.722207544564, 0.55, 0.377792455436,
              0.231801948466, 0.13425421037, 0.1],
    (9, 3): [1 / 3, 2 / 3, 1.0, 1.0, 0.939711431703, 0.775, 0.55, 0.325, 0.160288568297, 0.1],
    (4, 4): [0.25, 0.5, 0.75, 1.0, 1.0],
}


@pytest.mark.parametrize("total, warmup", sorted(PINNED_LR_FACTORS))
def test_lr_factor_is_warmup_then_cosine_to_ten_percent_at_every_step(total, warmup):
    factor = lr_lambda(warmup, total)
    assert [factor(s) for s in range(total + 1)] == pytest.approx(PINNED_LR_FACTORS[(total, warmup)], abs=1e-11)
    assert factor(total + 5) == pytest.approx(0.1)  # past the end it stays at the floor


def test_the_engines_scheduler_gives_lr_times_the_factor_and_resumes():
    hp, lr = {"warmup_steps": 2, "steps": 10}, 0.003
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=lr)
    scheduler = lr_schedule(optimizer, hp)
    seen = []
    for step in range(10):
        seen.append(scheduler.get_last_lr()[0])  # the lr optimizer step `step` uses
        optimizer.step()
        scheduler.step()
        if step == 4:
            saved = scheduler.state_dict()
    assert seen == pytest.approx([lr * f for f in PINNED_LR_FACTORS[(10, 2)][:10]], abs=1e-14)
    again = lr_schedule(torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=lr), hp)
    again.load_state_dict(saved)
    assert again.get_last_lr()[0] == pytest.approx(seen[5], abs=1e-14)


def test_batches_cover_each_epoch_once_across_ranks_and_are_pure():
    n, world, b, accum = 10, 2, 2, 1
    ranks = [BatchSchedule(n, world=world, rank=r, batch_size=b, grad_accum=accum, seed=3) for r in range(world)]
    seen = []
    for step in range(0, 5):  # 5 steps x 4 examples = 2 epochs
        for micro in range(accum):
            parts = [s.indices(step, micro) for s in ranks]
            if step < 2:  # steps 0-1 lie inside epoch 0: the ranks share no example
                assert not set(parts[0]) & set(parts[1])
            seen += parts[0] + parts[1]
    assert sorted(seen[:10]) == list(range(10)) and sorted(seen[10:]) == list(range(10))
    assert seen[:10] != seen[10:]  # each epoch reshuffled
    fresh = BatchSchedule(n, world=world, rank=1, batch_size=b, grad_accum=accum, seed=3)
    assert fresh.indices(4, 0) == ranks[1].indices(4, 0)  # resuming needs only the step

"""train.sampler=pk|rsk|ibc|roth: each rule's steps per epoch equal a count made here, independently,
over CUB-, Cars- and SOP-shaped class sizes; the milestones land on the authors' steps; every rule
gives the same global batch whatever the world size and after a resume (a fresh sampler at step t)."""
import math
import random

import numpy as np
import pytest

from pipeline.config import TrainConfig, load_config
from pipeline.data.epoch_rules import RSkSampler, build_sampler
from pipeline.data.loader import StepBatches
from pipeline.data.sampler import PKSampler
from pipeline.errors import UserError
from pipeline.train.optim import lr_factor, resolve_epochs

# Class sizes shaped like the training splits (counts written out, not read from the datasets):
# CUB-200-2011 classes 1-100 (5,864 images, 41 to 60 per class); Cars196 classes 1-98 (8,054 images,
# 59 to 97 per class, here a spread); SOP's 11,318 training products (2 to 12 images each).
CUB = [60] * 80 + [59] * 10 + [58, 57, 56, 55, 53, 52, 50, 48, 45, 41]
CARS = [59 + (i * 7) % 39 for i in range(98)]
SOP = [2 + (i * 5) % 11 for i in range(11318)]


def labels_of(sizes):
    return np.repeat(np.arange(len(sizes)), sizes)


def rsk_count(sizes, order, k, batch):
    """The RS@k authors' reshuffle (src/datasets.py:313-334) written as they wrote it, on class sizes."""
    left = {c: sizes[c] for c in order}
    batches, current = 0, []
    while True:
        for c in order:
            if left[c] >= k and len(current) < batch / k:
                current.append(c)
                left[c] -= k
        if len(current) == batch / k:
            batches += 1
            current = []
        else:
            return batches


def ibc_count(sizes, p, k):
    """IBC's CombineSampler (combine_sampler.py:44-64): floor(max(n, K) / K) + 1 groups per class, padded to a
    multiple of P; batches of P groups."""
    groups = sum(max(n, k) // k + 1 for n in sizes)
    return math.ceil(groups / p)


@pytest.mark.parametrize("sizes, batch", [(CUB, 400), (CARS, 392)])
def test_rsk_on_cub_and_cars_puts_every_class_in_every_batch(sizes, batch):
    sampler, clock = build_sampler("rsk", labels_of(sizes), batch, 4, seed=3, small_classes="skip")
    assert clock.describe(3) == min(n // 4 for n in sizes)  # CUB: 10 (floor(41 / 4)), not 5,864 // 400 = 14
    labels = labels_of(sizes)
    seen = []
    for step in range(clock.epoch_start(1)):
        b = sampler.batch(step)
        assert sorted(labels[b].tolist()) == sorted(list(range(len(sizes))) * 4)
        seen += b.tolist()
    assert len(seen) == len(set(seen))  # without replacement within the epoch


def test_rsk_on_sop_counts_as_the_authors_loop():
    labels = labels_of(SOP)
    sampler = RSkSampler(labels, 4000, 4, seed=1, small_classes="skip")
    for epoch in range(3):
        order = np.random.default_rng([1, epoch, 2]).permutation(len(SOP))  # the epoch's class order
        assert sampler.epoch_length(epoch) == rsk_count(SOP, [int(c) for c in order], 4, 4000)
    total = sum(n // 4 for n in SOP)
    assert total // 1000 - 3 <= sampler.epoch_length(0) <= total // 1000


@pytest.mark.parametrize("sizes, p, k", [(CUB, 6, 9), (CARS, 10, 7), (SOP, 15, 6)])
def test_ibc_epoch(sizes, p, k):
    sampler, clock = build_sampler("ibc", labels_of(sizes), p * k, k, seed=0)
    assert clock.describe(2) == ibc_count(sizes, p, k)
    batches = [sampler.batch(s) for s in range(clock.epoch_start(1))] if len(sizes) < 1000 else []
    if batches:  # every image at least once an epoch, batches of P x K
        assert {len(b) for b in batches} == {p * k}
        assert set(np.concatenate(batches).tolist()) == set(range(sum(sizes)))


def test_ibc_on_cub_redraws_p_and_k_every_epoch():
    sampler, clock = build_sampler("ibc", labels_of(CUB), 54, 9, seed=0, redraw_pk=True)
    lengths = {p: ibc_count(CUB, p, 54 // p) for p in (2, 3, 6, 9, 18, 27)}  # the divisors of 54 in [2, 27]
    drawn = [sampler.shape(e) for e in range(40)]
    assert all(p * k == 54 and sampler.epoch_length(e) == lengths[p] for e, (p, k) in enumerate(drawn))
    assert len({p for p, _ in drawn}) > 2
    assert clock.epoch_start(40) == sum(lengths[p] for p, _ in drawn)
    cfg, facts = resolve_epochs(TrainConfig(global_batch=54, samples_per_class=9, sampler="ibc", redraw_pk=True,
                                            epochs=40), len(labels_of(CUB)), clock)
    assert cfg.max_steps == clock.epoch_start(40) and facts["steps_per_epoch"] == [lengths[p] for p, _ in drawn]


@pytest.mark.parametrize("name", ["pk", "roth"])
def test_pk_and_roth_epochs_are_images_over_batch(name):
    sampler, clock = build_sampler(name, labels_of(CUB), 112, 2, seed=0)
    assert clock.describe(5) == sum(CUB) // 112 and clock.epoch_start(150) == 150 * (sum(CUB) // 112)


def test_pk_is_the_projects_sampler_and_roth_draws_classes_with_replacement():
    labels = labels_of(CUB)
    pk, _ = build_sampler("pk", labels, 112, 2, seed=5)
    assert type(pk) is PKSampler and np.array_equal(pk.batch(7), PKSampler(labels, 112, 2, 5).batch(7))
    roth, _ = build_sampler("roth", labels, 112, 2, seed=5)
    repeats = [len(b) // 2 - len(set(labels[b].tolist())) for b in map(roth.batch, range(20))]
    assert max(repeats) > 0  # a class fills several groups of one batch; pk never does with 56 <= 100 classes
    assert all(len(set(labels[pk.batch(s)].tolist())) == 56 for s in range(20))


@pytest.mark.parametrize("name, sizes, batch, k", [("rsk", CUB, 400, 4), ("ibc", CUB, 54, 9), ("roth", CUB, 112, 2),
                                                   ("pk", CUB, 112, 2), ("rsk", CARS, 392, 4)])
def test_world_size_and_resume_do_not_change_the_batches(name, sizes, batch, k):
    labels = labels_of(sizes)
    make = lambda: build_sampler(name, labels, batch, k, seed=2, small_classes="skip" if name == "rsk" else "repeat",
                                 redraw_pk=name == "ibc")[0]
    whole = [b for b in StepBatches(make(), 0, 25, 0, 1)]
    halves = [list(StepBatches(make(), 0, 25, r, 2)) for r in (0, 1)]
    assert [a + b for a, b in zip(*halves)] == whole  # (index, augmentation seed) pairs, ranks side by side
    resumed = list(StepBatches(make(), 13, 25, 0, 1))  # a fresh sampler from step 13, as after a resume
    assert resumed == whole[13:]


def test_milestones_land_on_the_authors_epoch_boundaries():
    """recipe=rsk data=cub: 10 batches an epoch (floor(41 / 4)); the lr x 0.3 at steps 100, 200, 300; 400 steps."""
    cfg = load_config(["recipe=rsk", "data=cub"]).train
    assert cfg.sampler == "rsk" and cfg.milestones == [10, 20, 30]
    _, clock = build_sampler("rsk", labels_of(CUB), cfg.global_batch, cfg.samples_per_class, 0, cfg.small_classes)
    cfg, facts = resolve_epochs(cfg, sum(CUB), clock)
    assert cfg.max_steps == 400 and facts["steps_per_epoch"] == 10 and facts["sampler"] == "rsk"
    factor = lr_factor(cfg, clock)
    assert [factor(s) for s in (99, 100, 199, 200, 299, 300)] == pytest.approx([1, 0.3, 0.3, 0.09, 0.09, 0.027])
    ibc = load_config(["recipe=ibc", "data=sop"]).train
    _, clock = build_sampler("ibc", labels_of(SOP), ibc.global_batch, ibc.samples_per_class, 0)
    per_epoch = ibc_count(SOP, 15, 6)
    assert lr_factor(ibc, clock)(30 * per_epoch - 1) == 1 and lr_factor(ibc, clock)(30 * per_epoch) == pytest.approx(0.1)


def test_sampler_keys_are_checked():
    with pytest.raises(UserError, match="train.sampler=rks: use one of pk, rsk, ibc, roth"):
        load_config(["train.sampler=rks"])
    with pytest.raises(UserError, match="train.redraw_pk=true is IBC's"):
        load_config(["train.redraw_pk=true"])
    with pytest.raises(UserError, match="no batch of 400"):
        build_sampler("rsk", labels_of([8] * 50), 400, 4, 0)[0].batch(0)


def test_the_count_here_is_the_authors_loop():
    """The independent count itself, against a direct run of the authors' loop on lists of items."""
    rng = random.Random(0)
    sizes = [rng.randint(2, 12) for _ in range(300)]
    order = list(range(300))
    rng.shuffle(order)
    items = {c: list(range(n)) for c, n in enumerate(sizes)}
    batches, batch = [], []
    while True:
        for c in order:
            if len(items[c]) >= 4 and len(batch) < 40 / 4:
                batch.append(items[c][:4])
                items[c] = items[c][4:]
        if len(batch) == 40 / 4:
            batches.append(batch)
            batch = []
        else:
            break
    assert rsk_count(sizes, order, 4, 40) == len(batches)

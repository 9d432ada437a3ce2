"""Roth et al.'s rho-regularisation miner: p_switch=0 is the base miner, 1 switches every negative, seeded."""
import torch
import torch.nn.functional as F
from pytorch_metric_learning import miners

from pipeline.losses.rho import RhoMiner
from pipeline.losses.seeding import set_step

LABELS = torch.tensor([0, 0, 0, 1, 1, 1, 1, 2, 2, 3])   # class 3: a single sample
EMB = F.normalize(torch.randn(10, 8, generator=torch.Generator().manual_seed(0)), dim=1)


def mine(p_switch, step=0, seed=0, base=None):
    miner = RhoMiner(base if base is not None else miners.TripletMarginMiner(margin=1.0, type_of_triplets="all"),
                     p_switch, seed)
    set_step(miner, step)
    return miner(EMB, LABELS)


def test_p_switch_zero_is_the_base_miner():
    base = miners.TripletMarginMiner(margin=1.0, type_of_triplets="all")(EMB, LABELS)
    for ours, theirs in zip(mine(0.0), base):
        assert torch.equal(ours, theirs)
    assert len(base[0]) > 20


def test_p_switch_one_switches_every_negative_to_a_same_class_sample():
    a, p, n = mine(1.0)
    base = mine(0.0)
    assert torch.equal(a, base[0]) and torch.equal(p, base[1])
    assert (LABELS[n] == LABELS[a]).all() and (n != a).all()
    # Every same-class sample is drawn for some anchor (uniform, not always the first).
    for anchor in range(3):
        assert set(n[a == anchor].tolist()) == {0, 1, 2} - {anchor}


def test_pairs_format_and_partial_switch():
    a1, p, a2, n = mine(0.5, base=miners.BatchEasyHardMiner())
    assert torch.equal(a1, mine(0.0, base=miners.BatchEasyHardMiner())[0])
    # A pair-format base (all pairs when base is None) switches its negative pairs.
    a1, p, a2, n = RhoMiner(None, 0.5, 0)(EMB, LABELS)
    same = LABELS[a2] == LABELS[n]
    has_partner = torch.bincount(LABELS)[LABELS[a2]] > 1
    share = same[has_partner].float().mean()
    assert 0.35 < share < 0.65, share


def test_seeded_by_seed_and_step():
    assert all(torch.equal(x, y) for x, y in zip(mine(0.5, step=3), mine(0.5, step=3)))
    assert not torch.equal(mine(0.5, step=3)[2], mine(0.5, step=4)[2])
    assert not torch.equal(mine(0.5, seed=1)[2], mine(0.5, seed=2)[2])

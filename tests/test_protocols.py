"""Each dataset's protocol, the user's overrides, and the split check."""
import pytest

from pipeline.errors import UserError
from pipeline.protocols import Evaluation, check_splits, resolve


@pytest.mark.parametrize("name, ks", [("cub", (1, 2, 4, 8, 16)), ("cars", (1, 2, 4, 8, 16)), ("sop", (1, 10, 100, 1000)),
                                      ("inat", (1, 4, 16, 32)), ("digits", (1, 2, 4, 8)),
                                      ("fashion_mnist", (1, 2, 4, 8)), ("a_new_dataset", (1, 2, 4, 8))])
def test_leave_one_out_datasets(name, ks):
    p = resolve(name, None, None, None)
    assert p.ks == ks and p.evaluations == (Evaluation("test", "test", None),) and p.splits == ["test"]


def test_inshop_is_query_to_gallery_and_vehicleid_leave_one_out_in_each_list():
    inshop = resolve("inshop", None, None, None)
    assert inshop.ks == (1, 10, 20, 30, 40) and inshop.evaluations == (Evaluation("test", "query", "gallery"),)
    vehicle = resolve("vehicleid", None, None, None)
    assert vehicle.ks == (1, 5)
    assert vehicle.evaluations == tuple(Evaluation(f"test{s}", f"test{s}", None) for s in (800, 1600, 2400))
    assert vehicle.splits == ["test800", "test1600", "test2400"]


def test_overrides():
    p = resolve("sop", [1, 5], "train", None)
    assert p.ks == (1, 5) and p.evaluations == (Evaluation("train", "train", None),)
    p = resolve("vehicleid", None, "test800_query", "test800_gallery")
    assert p.ks == (1, 5) and p.evaluations == (Evaluation("test800_query", "test800_query", "test800_gallery"),)
    with pytest.raises(UserError, match="needs eval.split"):
        resolve("cub", None, None, "gallery")
    with pytest.raises(UserError, match="positive integers"):
        resolve("cub", [0, 1], None, None)


def test_missing_split_is_one_clear_line():
    with pytest.raises(UserError, match=r"needs split\(s\) query, gallery, which are not in /x \(splits: train, test\)"):
        check_splits(resolve("inshop", None, None, None), ["train", "test"], "/x")

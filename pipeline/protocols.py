"""Each dataset's evaluation protocol: which splits are queries and gallery, and the standard ks.

    leave-one-out  every test image queries all the others (CUB, Cars, SOP, iNat, digits, ...; VehicleID
                   inside each test list, test800, test1600 and test2400, each reported on its own, as
                   the RS@k authors evaluate it: src/main.py:272-275, src/evaluate.py:127-134)
    query->gallery query split against a gallery split (In-Shop)

CUB and Cars report recall@1, 2, 4, 8 and 16 (RS@k src/main.py:115, 135). VehicleID's other common
form, one seeded image per vehicle as the gallery and the rest as queries, is kept in the shards
(`test{S}_query`, `test{S}_gallery`): `eval.split=test800_query eval.gallery=test800_gallery`.

`resolve(data_name, eval_cfg)` applies the user's overrides: `eval.ks` replaces the standard ks;
`eval.split` (with `eval.gallery` for query->gallery) replaces the protocol's splits by one
evaluation. Split names are the ones the shard stage writes.
"""
from __future__ import annotations

from dataclasses import dataclass

from pipeline.errors import UserError


@dataclass(frozen=True)
class Evaluation:
    name: str                   # key in metrics.json when a protocol has several evaluations
    query: str                  # split of the queries
    gallery: str | None = None  # None: leave-one-out on the query split


@dataclass(frozen=True)
class Protocol:
    ks: tuple[int, ...]
    evaluations: tuple[Evaluation, ...]

    @property
    def splits(self) -> list[str]:
        names = [s for e in self.evaluations for s in (e.query, e.gallery) if s is not None]
        return list(dict.fromkeys(names))


def _leave_one_out(*ks: int) -> Protocol:
    return Protocol(ks, (Evaluation("test", "test"),))


VEHICLEID_SIZES = (800, 1600, 2400)
DEFAULT = _leave_one_out(1, 2, 4, 8)
PROTOCOLS = {
    "digits": DEFAULT,
    "fashion_mnist": DEFAULT,
    "imagefolder": DEFAULT,
    "csv": DEFAULT,
    "cub": _leave_one_out(1, 2, 4, 8, 16),
    "cars": _leave_one_out(1, 2, 4, 8, 16),
    "sop": _leave_one_out(1, 10, 100, 1000),
    "inat": _leave_one_out(1, 4, 16, 32),
    "inshop": Protocol((1, 10, 20, 30, 40), (Evaluation("test", "query", "gallery"),)),
    "vehicleid": Protocol((1, 5), tuple(Evaluation(f"test{s}", f"test{s}") for s in VEHICLEID_SIZES)),
}


def protocol(data_name: str) -> Protocol:
    """The standard protocol of a dataset; datasets without one (a new converter) get leave-one-out on test."""
    return PROTOCOLS.get(data_name, DEFAULT)


def resolve(data_name: str, ks: list[int] | None, split: str | None, gallery: str | None) -> Protocol:
    """The dataset's protocol with the user's eval.ks / eval.split / eval.gallery applied."""
    base = protocol(data_name)
    if gallery is not None and split is None:
        raise UserError(f"eval.gallery={gallery} needs eval.split=<query split> too")
    if ks is not None and (not ks or min(ks) < 1):
        raise UserError(f"eval.ks={list(ks)}: give positive integers, e.g. eval.ks=[1,2,4,8]")
    evaluations = base.evaluations if split is None else (Evaluation(split, split, gallery),)
    return Protocol(tuple(ks) if ks is not None else base.ks, evaluations)


def check_splits(proto: Protocol, available: list[str], where: str) -> None:
    missing = [s for s in proto.splits if s not in available]
    if missing:
        raise UserError(f"the evaluation needs split(s) {', '.join(missing)}, which are not in {where} "
                        f"(splits: {', '.join(available)}); set eval.split (and eval.gallery) to evaluate others")

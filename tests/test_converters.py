"""Dataset converters on small fixture folders written in each dataset's exact on-disk format."""
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from scipy.io import savemat

from pipeline.config import DataConfig
from pipeline.data.converters import convert
from pipeline.data.shards import write_split
from pipeline.errors import UserError


def jpg(path: Path, value: int = 0) -> str:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full((10, 12, 3), value, dtype=np.uint8)).save(path)
    return str(path)


def lines(path: Path, rows) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(" ".join(map(str, r)) + "\n" for r in rows))


def run(name: str, root: Path, **kw) -> dict:
    return convert(DataConfig(name=name, root=str(root), **kw), seed=0)


def check_files(splits: dict) -> None:
    for records in splits.values():
        for r in records:
            assert Path(r.image).is_file(), r.image
        assert len({r.key for r in records}) == len(records)


def write_cub(root: Path) -> None:
    """CUB_200_2011/: images.txt, image_class_labels.txt, train_test_split.txt, images/<class>/<file>."""
    root = root / "CUB_200_2011"
    ids = [(1, 1), (2, 1), (3, 100), (4, 101), (5, 150), (6, 200)]
    names = [(i, f"{c:03d}.Bird_{c}/Bird_{c}_{i:04d}_{i}.jpg") for i, c in ids]
    lines(root / "images.txt", names)
    lines(root / "image_class_labels.txt", ids)
    lines(root / "train_test_split.txt", [(i, i % 2) for i, _ in ids])  # a closed-set split: ignored
    for _, name in names:
        jpg(root / "images" / name)


def test_cub(tmp_path):
    write_cub(tmp_path)
    splits = run("cub", tmp_path)
    check_files(splits)
    assert [r.label for r in splits["train"]] == [1, 1, 100]
    assert [r.label for r in splits["test"]] == [101, 150, 200]
    assert splits["test"][0].meta["path"] == "images/101.Bird_101/Bird_101_0004_4.jpg"


def test_cars(tmp_path):
    """cars_annos.mat as Stanford ships it: a 1 x N struct array `annotations`, plus `class_names`."""
    fields = ["relative_im_path", "bbox_x1", "bbox_y1", "bbox_x2", "bbox_y2", "class", "test"]
    classes = [1, 98, 99, 196, 5]
    annotations = np.zeros((1, len(classes)), dtype=[(f, "O") for f in fields])
    for i, c in enumerate(classes):
        path = f"car_ims/{i + 1:06d}.jpg"
        jpg(tmp_path / path)
        annotations[0, i] = (path, np.array([[1]], np.uint8), np.array([[2]], np.uint8), np.array([[9]], np.uint8),
                             np.array([[8]], np.uint8), np.array([[c]], np.uint8), np.array([[i % 2]], np.uint8))
    savemat(tmp_path / "cars_annos.mat", {"annotations": annotations,
                                          "class_names": np.array([[f"Car {c}" for c in range(1, 197)]], dtype=object)})
    splits = run("cars", tmp_path)
    check_files(splits)
    assert [r.label for r in splits["train"]] == [1, 98, 5]
    assert [r.label for r in splits["test"]] == [99, 196]
    assert splits["test"][1].meta["path"] == "car_ims/000004.jpg"


def test_sop(tmp_path):
    header = ("image_id", "class_id", "super_class_id", "path")
    train = [(1, 1, 1, "bicycle_final/111085122871_0.JPG"), (2, 1, 1, "bicycle_final/111085122871_1.JPG"),
             (3, 2, 2, "cabinet_final/2225_0.JPG")]
    test = [(59552, 11319, 1, "bicycle_final/251952414262_0.JPG"), (59553, 11319, 1, "bicycle_final/251952414262_1.JPG")]
    lines(tmp_path / "Ebay_train.txt", [header, *train])
    lines(tmp_path / "Ebay_test.txt", [header, *test])
    lines(tmp_path / "Ebay_info.txt", [header])
    for row in train + test:
        jpg(tmp_path / row[3])
    splits = run("sop", tmp_path)
    check_files(splits)
    assert [r.label for r in splits["train"]] == [1, 1, 2] and [r.label for r in splits["test"]] == [11319, 11319]
    assert splits["train"][2].meta == {"path": "cabinet_final/2225_0.JPG", "super_class": 2}


def test_inshop(tmp_path):
    """Eval/list_eval_partition.txt (count line, header, rows) and Img/img/..."""
    rows = [("img/WOMEN/Dresses/id_00000002/02_1_front.jpg", "id_00000002", "train"),
            ("img/WOMEN/Dresses/id_00000002/02_2_side.jpg", "id_00000002", "train"),
            ("img/MEN/Denim/id_00000080/01_1_front.jpg", "id_00000080", "query"),
            ("img/MEN/Denim/id_00000080/01_2_side.jpg", "id_00000080", "gallery"),
            ("img/MEN/Denim/id_00000081/01_1_front.jpg", "id_00000081", "gallery")]
    lines(tmp_path / "Eval" / "list_eval_partition.txt", [(len(rows),), ("image_name", "item_id", "evaluation_status"), *rows])
    for path, _, _ in rows:
        jpg(tmp_path / "Img" / path)
    splits = run("inshop", tmp_path)
    check_files(splits)
    assert {k: [r.label for r in v] for k, v in splits.items()} == {"train": [2, 2], "query": [80], "gallery": [80, 81]}


def test_inat(tmp_path):
    """The Smooth-AP split files: one image path per line, species id as the last folder."""
    train = ["train_val2018/Plantae/7477/3b60c9486db1d2ee875f11a669fbde4a.jpg",
             "train_val2018/Plantae/7477/1a2b.jpg", "train_val2018/Aves/2761/ff00.jpg"]
    test = ["train_val2018/Insecta/1234/aa11.jpg"]
    lines(tmp_path / "Inat_dataset_splits" / "Inaturalist_train_set1.txt", [(p,) for p in train])
    lines(tmp_path / "Inat_dataset_splits" / "Inaturalist_test_set1.txt", [(p,) for p in test])
    for path in train + test:
        jpg(tmp_path / path)
    splits = run("inat", tmp_path)
    check_files(splits)
    assert [r.label for r in splits["train"]] == [7477, 7477, 2761] and [r.label for r in splits["test"]] == [1234]


def test_vehicleid_lists_and_their_gallery_form(tmp_path):
    rows = [(f"{i:07d}", vehicle) for i, vehicle in enumerate([1, 1, 1, 2, 2, 3, 3, 3, 3])]
    lines(tmp_path / "train_test_split" / "train_list.txt", rows[:3])
    for size in (800, 1600, 2400):
        lines(tmp_path / "train_test_split" / f"test_list_{size}.txt", rows[3:])
    for image, _ in rows:
        jpg(tmp_path / "image" / f"{image}.jpg")
    splits = run("vehicleid", tmp_path)
    check_files(splits)
    assert set(splits) == {"train"} | {f"test{s}{p}" for s in (800, 1600, 2400) for p in ("", "_query", "_gallery")}
    for size in (800, 1600, 2400):
        assert [(r.key, r.label) for r in splits[f"test{size}"]] == [(f"v{i}", v) for i, v in rows[3:]]  # the list
        gallery, query = splits[f"test{size}_gallery"], splits[f"test{size}_query"]
        assert sorted(r.label for r in gallery) == [2, 3]
        assert sorted(r.label for r in query) == [2, 3, 3, 3]
        assert {r.key for r in gallery} | {r.key for r in query} == {f"v{i}" for i, _ in rows[3:]}
    again = run("vehicleid", tmp_path)
    assert [r.key for r in again["test800_gallery"]] == [r.key for r in splits["test800_gallery"]]


def test_csv_split_is_seeded_and_class_disjoint(tmp_path):
    rows = ["path,label"] + [f"imgs/{c}_{j}.jpg,{c}" for c in ("cat", "dog", "fox", "owl") for j in range(2)]
    (tmp_path / "labels.csv").write_text("\n".join(rows) + "\n")
    for row in rows[1:]:
        jpg(tmp_path / row.split(",")[0])
    splits = run("csv", tmp_path / "labels.csv")
    check_files(splits)
    train, test = ({r.meta["class"] for r in splits[s]} for s in ("train", "test"))
    assert len(test) == 2 and not train & test and train | test == {"cat", "dog", "fox", "owl"}
    assert [r.key for r in run("csv", tmp_path / "labels.csv")["test"]] == [r.key for r in splits["test"]]


def test_fixture_records_go_through_the_shard_writer(tmp_path):
    write_cub(tmp_path / "cub")
    summary = write_split(run("cub", tmp_path / "cub")["train"], tmp_path / "out", "train", 8, "jpg", 100, 1 << 20)
    assert (summary["images"], summary["classes"], summary["skipped"]) == (3, 2, 0)


@pytest.mark.parametrize("name, missing", [("cub", "images.txt"), ("cars", "cars_annos.mat"), ("sop", "Ebay_train.txt"),
                                           ("inshop", "list_eval_partition.txt"), ("inat", "Inaturalist_train_set1.txt"),
                                           ("vehicleid", "train_test_split/train_list.txt")])
def test_missing_list_file_is_one_clear_line(tmp_path, name, missing):
    with pytest.raises(UserError, match=f"has no {missing}; set data.root"):
        run(name, tmp_path)
    with pytest.raises(UserError, match=f"data={name} needs data.root"):
        convert(DataConfig(name=name), seed=0)


def test_csv_errors(tmp_path):
    with pytest.raises(UserError, match="data.root=/path/to/labels.csv"):
        run("csv", tmp_path / "none.csv")
    (tmp_path / "bad.csv").write_text("file,class\na.jpg,x\n")
    with pytest.raises(UserError, match="columns path,label"):
        run("csv", tmp_path / "bad.csv")

"""data.image_size=0 keeps the original files' size in the shards (the recipes crop the originals,
as the authors' code does); a size > 0 still shrinks the shorter side to it."""
import pytest
from PIL import Image

from pipeline.config import load_config
from pipeline.data.converters import Record
from pipeline.data.shards import _load
from pipeline.errors import UserError


def test_size_zero_keeps_the_original_and_a_size_shrinks_it(tmp_path):
    path = tmp_path / "a.jpg"
    Image.new("RGB", (300, 200), (10, 20, 30)).save(path)
    assert _load(Record("a", 0, path), 0).size == (300, 200)
    assert _load(Record("a", 0, path), 100).size == (150, 100)


def test_recipes_keep_the_originals_on_their_datasets_and_generated_data_refuses_zero():
    assert load_config(["recipe=rsk", "data=cub"]).data.image_size == 0
    assert load_config(["recipe=roth", "data=sop"]).data.image_size == 0
    assert load_config(["recipe=rsk", "data=digits"]).data.image_size == 32
    with pytest.raises(UserError, match="data.image_size=0: give a side in pixels"):
        load_config(["data=digits", "data.image_size=0"])

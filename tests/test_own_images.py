"""Your own images as a dataset: a folder (any sub-folders and extensions) with a labels file, no VOC layout,
through check-data, train (the `finetune` preset), cam and pseudo with the same commands as on VOC."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from wsss.cli.main import main
from wsss.data.io import load_maps
from wsss.data.voc import VOCDataset
from wsss.errors import ConfigError, DataError


@pytest.fixture()
def photos(shared_data, tmp_path) -> Path:
    """Three horses and two street frames in nested folders, mixed extensions, a labels.csv with and without
    extensions in its keys: what a user has, not a VOC layout."""
    root = tmp_path / "photos"
    (root / "horses").mkdir(parents=True)
    (root / "streets" / "day").mkdir(parents=True)
    for i in (1, 2, 3):
        (root / "horses" / f"horse00{i}.jpg").write_bytes(
            (shared_data / "horses" / "JPEGImages" / f"horse00{i}.jpg").read_bytes())
    frames = sorted((shared_data / "camvid" / "JPEGImages").iterdir())[:2]
    (root / "streets" / "day" / "street1.JPG").write_bytes(frames[0].read_bytes())
    (root / "streets" / "street2.jpeg").write_bytes(frames[1].read_bytes())
    (root / "labels.csv").write_text("image,labels\nhorses/horse001.jpg,horse\nhorses/horse002,Horse\n"
                                     "horses/horse003.jpg,horse;person\nstreets/day/street1.JPG,car person\n"
                                     "streets/street2,car\n")
    return root


def test_a_folder_with_a_labels_file_is_a_dataset(photos):
    dataset = VOCDataset(photos, None)
    assert dataset.ids == ["horses/horse001", "horses/horse002", "horses/horse003", "streets/day/street1",
                           "streets/street2"]
    assert dataset.classes.names == ("background", "car", "horse", "person")  # sorted, after background
    assert [dataset.labels(i).tolist() for i in range(5)] == [[0, 1, 0], [0, 1, 0], [0, 1, 1], [1, 0, 1], [1, 0, 0]]
    assert dataset.image_path("streets/day/street1").name == "street1.JPG"
    assert not dataset.has_masks
    assert VOCDataset(photos, "all").ids == dataset.ids
    assert VOCDataset(photos, None, background=False).classes.names == ("car", "horse", "person")
    # The class list of the model trained on it wins over the labels file's, and classes.txt over both.
    assert VOCDataset(photos, None, class_names=["background", "horse", "car", "person"]).classes.names[1] == "horse"
    (photos / "classes.txt").write_text("background\nperson\nhorse\ncar\n")
    assert VOCDataset(photos, None, class_names=["x", "y"]).classes.names == ("background", "person", "horse", "car")
    with pytest.raises(ConfigError, match="without split lists"):
        VOCDataset(photos, "train")


def test_folder_dataset_errors_name_the_file(photos, shared_data):
    with pytest.raises(ConfigError, match="name a split"):
        VOCDataset(shared_data / "msrc", None)
    (photos / "labels.csv").unlink()
    (photos / "labels.json").write_text(json.dumps({"horses/horse001": [2]}))
    with pytest.raises(DataError, match="labels.json.*need a classes.txt"):
        VOCDataset(photos, None)
    (photos / "labels.json").write_text(json.dumps({"horses/horse009": ["horse"]}))
    with pytest.raises(DataError, match="horse009"):
        VOCDataset(photos, None)


def test_check_data_train_cam_and_pseudo_on_your_own_images(photos, tmp_path, capsys):
    assert main(["check-data", "--data", str(photos)]) == 0
    assert "5 images, 4 classes" in capsys.readouterr().out
    run = tmp_path / "run"
    assert main(["train", "--config", "finetune", f"data.root={photos}", f"run_dir={run}", "model.name=vit_nano_patch16",
                 "train.steps=2", "data.batch_size=2", "data.num_workers=0", "device=cpu"]) == 0
    maps = tmp_path / "maps"
    assert main(["cam", "--checkpoint", str(run), "--data", str(photos), "--method", "getam", "--out", str(maps),
                 "--threshold", "0.3", "--device", "cpu"]) == 0
    for image_id, classes in (("horses/horse003", [2, 3]), ("streets/day/street1", [1, 3])):
        m, labels = load_maps(maps / f"{image_id}.npz")
        assert labels.tolist() == classes
        png = np.asarray(Image.open(maps / "labels" / f"{image_id}.png"))
        assert png.shape == m.shape[1:] and set(np.unique(png).tolist()) <= {0, *classes}
    pseudo = tmp_path / "pseudo"
    assert main(["pseudo", "--checkpoint", str(run), "--data", str(photos), "--threshold", "0.3", "--out",
                 str(pseudo), "--device", "cpu"]) == 0
    assert len(list(pseudo.rglob("*.png"))) == 5
    # A labelled image that is missing is a problem check-data names (exit 1).
    (photos / "streets" / "street2.jpeg").unlink()
    assert main(["check-data", "--data", str(photos)]) == 1
    assert "street2" in capsys.readouterr().out

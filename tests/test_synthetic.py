"""The bundled synthetic COCO-format dataset and the dataset checks."""
import hashlib
import json
import os
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image
from pycocotools.coco import COCO

from d2norm.data import CLASSES, SyntheticSpec, check_datasets_exist, ensure_synthetic_dataset, register_synthetic_dataset

SPEC = SyntheticSpec(image_size=96, num_train=24, num_val=8, seed=3)


def _tree_hash(d):
    h = hashlib.sha256()
    for root, _, files in sorted(os.walk(d)):
        for f in sorted(files):
            h.update(f.encode())
            with open(os.path.join(root, f), "rb") as fh:
                h.update(fh.read())
    return h.hexdigest()


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    return ensure_synthetic_dataset(str(tmp_path_factory.mktemp("synth")), SPEC)


def test_deterministic(dataset, tmp_path):
    again = ensure_synthetic_dataset(str(tmp_path), SPEC)
    assert os.path.basename(again) == os.path.basename(dataset)
    assert _tree_hash(again) == _tree_hash(dataset)
    other = ensure_synthetic_dataset(str(tmp_path), SyntheticSpec(image_size=96, num_train=24, num_val=8, seed=4))
    assert other != again and _tree_hash(other) != _tree_hash(again)


def test_valid_coco_with_consistent_boxes_and_masks(dataset):
    for split, n in (("train", SPEC.num_train), ("val", SPEC.num_val)):
        coco = COCO(os.path.join(dataset, "annotations", f"instances_{split}.json"))
        assert len(coco.getImgIds()) == n
        assert [c["name"] for c in coco.loadCats(coco.getCatIds())] == list(CLASSES)
        for img in coco.loadImgs(coco.getImgIds()):
            pixels = np.asarray(Image.open(os.path.join(dataset, split, img["file_name"])))
            assert pixels.shape == (img["height"], img["width"], 3)
            anns = coco.loadAnns(coco.getAnnIds(imgIds=img["id"]))
            assert 1 <= len(anns) <= SPEC.max_objects
            union = np.zeros(pixels.shape[:2], dtype=np.int32)
            for a in anns:
                m = coco.annToMask(a).astype(bool)
                union += m
                ys, xs = np.nonzero(m)
                x, y, w, h = a["bbox"]
                # tight box of the rasterized mask agrees with the annotated box (within rasterization)
                assert abs(xs.min() - x) <= 1.5 and abs(ys.min() - y) <= 1.5
                assert abs(xs.max() + 1 - (x + w)) <= 1.5 and abs(ys.max() + 1 - (y + h)) <= 1.5
                assert abs(m.sum() - a["area"]) <= 0.05 * a["area"] + 2
                assert 0 <= x and 0 <= y and x + w <= img["width"] and y + h <= img["height"]
            assert union.max() <= 1, "objects overlap, masks would not match the pixels"


def test_object_sizes_span_all_fpn_levels(dataset):
    coco = json.load(open(os.path.join(dataset, "annotations", "instances_train.json")))
    sizes = np.sqrt([a["bbox"][2] * a["bbox"][3] for a in coco["annotations"]])
    # anchors 8..128 px in configs/cpu: P2/P3 need < 16 px objects, P6/P7 > 48 px at 96-128 px images
    assert sizes.min() < 10 and sizes.max() > 48


def test_objects_are_visible_in_pixels(dataset):
    coco = COCO(os.path.join(dataset, "annotations", "instances_val.json"))
    contrasts = []
    for a in coco.loadAnns(coco.getAnnIds()):
        img = coco.loadImgs(a["image_id"])[0]
        pixels = np.asarray(Image.open(os.path.join(dataset, "val", img["file_name"]))).astype(float)
        m = coco.annToMask(a).astype(bool)
        contrasts.append(np.abs(pixels[m].mean(0) - pixels[~m].mean(0)).max())
    assert np.median(contrasts) > 20


def test_registered_and_loadable(tmp_path):
    from detectron2.data import DatasetCatalog, MetadataCatalog

    register_synthetic_dataset(str(tmp_path), SPEC)
    dicts = DatasetCatalog.get("d2norm_synthetic_val")
    assert len(dicts) == SPEC.num_val
    assert all(0 <= a["category_id"] < 3 for d in dicts for a in d["annotations"])
    assert MetadataCatalog.get("d2norm_synthetic_val").thing_classes == list(CLASSES)
    check_datasets_exist(["d2norm_synthetic_train", "d2norm_synthetic_val"])


def test_bad_spec_and_missing_datasets(tmp_path):
    with pytest.raises(ValueError, match="image_size must be >= 32, got 8"):
        SyntheticSpec(image_size=8)
    with pytest.raises(KeyError, match="'no_such_set' is not registered"):
        check_datasets_exist(["no_such_set"])
    code = (
        "import d2norm; from d2norm.data import check_datasets_exist\n"
        "try:\n    check_datasets_exist(['coco_2017_val'])\n"
        "except FileNotFoundError as e:\n    print('ERR', e)\n"
    )
    env = dict(os.environ, DETECTRON2_DATASETS=str(tmp_path / "nowhere"))
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120).stdout
    assert "ERR Dataset 'coco_2017_val'" in out and "DETECTRON2_DATASETS" in out and "nowhere" in out


def test_builtin_coco_names_follow_DETECTRON2_DATASETS(dataset, tmp_path):
    """The real-COCO path: a COCO layout under $DETECTRON2_DATASETS is found by detectron2's builtin names."""
    from detectron2.data.datasets.builtin_meta import COCO_CATEGORIES

    coco_root = tmp_path / "coco"
    (coco_root / "annotations").mkdir(parents=True)
    os.symlink(os.path.join(dataset, "val"), coco_root / "val2017")
    # detectron2 checks the json's categories against COCO's 80 thing classes: keep ours as ids 1-3 of those.
    ann = json.load(open(os.path.join(dataset, "annotations", "instances_val.json")))
    ann["categories"] = [{"id": c["id"], "name": c["name"]} for c in COCO_CATEGORIES if c["isthing"]]
    with open(coco_root / "annotations" / "instances_val2017.json", "w") as f:
        json.dump(ann, f)
    code = (
        "import d2norm; from d2norm.data import check_datasets_exist\n"
        "from detectron2.data import DatasetCatalog\n"
        "check_datasets_exist(['coco_2017_val']); print('N', len(DatasetCatalog.get('coco_2017_val')))\n"
    )
    env = dict(os.environ, DETECTRON2_DATASETS=str(tmp_path))
    res = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert f"N {SPEC.num_val}" in res.stdout, res.stderr[-2000:]


def test_synthetic_root_follows_DETECTRON2_DATASETS_with_normal_permissions(tmp_path, monkeypatch):
    """A user's steps: default cfg, ``DETECTRON2_DATASETS`` set (then unset) -> the set goes to
    ``$DETECTRON2_DATASETS/d2norm_synthetic`` (default ``./datasets/d2norm_synthetic`` as detectron2's own
    builtin datasets), readable by others as any directory the user creates (umask), not mode 0700."""
    from detectron2.config import get_cfg

    from d2norm import add_d2norm_config
    from d2norm.data import prepare_datasets, synthetic_root

    cfg = add_d2norm_config(get_cfg())
    cfg.merge_from_list(["DATASETS.TRAIN", ("d2norm_synthetic_train",), "DATASETS.TEST", ("d2norm_synthetic_val",),
                         "D2NORM.DATA.SYNTHETIC_IMAGE_SIZE", 32, "D2NORM.DATA.SYNTHETIC_NUM_TRAIN", 2,
                         "D2NORM.DATA.SYNTHETIC_NUM_VAL", 1])
    monkeypatch.setenv("DETECTRON2_DATASETS", str(tmp_path / "d2data"))
    monkeypatch.chdir(tmp_path)
    assert synthetic_root(cfg) == str(tmp_path / "d2data" / "d2norm_synthetic")
    prepare_datasets(cfg)
    from detectron2.data import MetadataCatalog

    json_file = MetadataCatalog.get("d2norm_synthetic_val").json_file
    assert json_file.startswith(str(tmp_path / "d2data" / "d2norm_synthetic") + os.sep)
    assert not (tmp_path / "datasets").exists()
    umask = os.umask(0)
    os.umask(umask)
    directory = os.path.dirname(os.path.dirname(json_file))
    for d in (directory, os.path.join(directory, "val"), os.path.join(directory, "annotations")):
        assert os.stat(d).st_mode & 0o777 == 0o777 & ~umask, (d, oct(os.stat(d).st_mode))

    monkeypatch.delenv("DETECTRON2_DATASETS")
    assert synthetic_root(cfg) == os.path.join("datasets", "d2norm_synthetic")
    cfg.D2NORM.DATA.SYNTHETIC_ROOT = str(tmp_path / "explicit")  # an explicit root wins over the variable
    monkeypatch.setenv("DETECTRON2_DATASETS", str(tmp_path / "d2data"))
    assert synthetic_root(cfg) == str(tmp_path / "explicit")

"""A deterministic synthetic COCO-format detection + instance-segmentation dataset, sized for CPU.

Images contain non-overlapping textured shapes of three classes (rectangle, ellipse, triangle) on a noisy,
shaded background. Object sizes are log-uniform between ``min_size`` and ``max_frac * image_size`` so that every
FPN level (P2-P7 with the anchor sizes of ``configs/cpu``) receives objects. Each object's segmentation polygon
is exactly the polygon that was rasterized into the image, so boxes and masks are consistent with pixels.

The dataset is written to disk as PNG images + ``annotations/instances_{train,val}.json`` and registered with
detectron2's ``register_coco_instances``, so ``COCOEvaluator`` and pycocotools run on it unchanged.
"""
import hashlib
import json
import logging
import math
import os
import shutil
import tempfile
from dataclasses import asdict, dataclass
from typing import Dict, List, Tuple

import numpy as np
from PIL import Image, ImageDraw

from ..options import Int, Option, declare_node

__all__ = [
    "SyntheticSpec",
    "CLASSES",
    "generate_split",
    "ensure_synthetic_dataset",
    "register_synthetic_dataset",
    "spec_from_cfg",
    "synthetic_root",
    "TRAIN_NAME",
    "VAL_NAME",
]

logger = logging.getLogger(__name__)

CLASSES = ("rectangle", "ellipse", "triangle")
TRAIN_NAME = "d2norm_synthetic_train"
VAL_NAME = "d2norm_synthetic_val"
_GENERATOR_VERSION = 1


@dataclass(frozen=True)
class SyntheticSpec:
    image_size: int = 128
    num_train: int = 400
    num_val: int = 100
    seed: int = 0
    min_size: float = 6.0
    max_frac: float = 0.8
    max_objects: int = 6

    def __post_init__(self):
        checks = [
            (self.image_size >= 32, f"image_size must be >= 32, got {self.image_size}"),
            (self.num_train >= 1, f"num_train must be >= 1, got {self.num_train}"),
            (self.num_val >= 1, f"num_val must be >= 1, got {self.num_val}"),
            (0 < self.min_size < self.image_size, f"min_size must be in (0, image_size), got {self.min_size}"),
            (0 < self.max_frac <= 1, f"max_frac must be in (0, 1], got {self.max_frac}"),
            (self.max_objects >= 1, f"max_objects must be >= 1, got {self.max_objects}"),
        ]
        for ok, msg in checks:
            if not ok:
                raise ValueError(f"SyntheticSpec: {msg}")

    def key(self) -> str:
        blob = json.dumps({**asdict(self), "v": _GENERATOR_VERSION}, sort_keys=True)
        return hashlib.sha1(blob.encode()).hexdigest()[:10]


def _shape_polygon(rng: np.random.Generator, cls: int, cx: float, cy: float, size: float) -> List[float]:
    """Polygon (x0, y0, x1, y1, ...) of a shape of class ``cls`` whose extent is about ``size``."""
    half = size / 2.0
    if cls == 0:  # rectangle, random aspect and rotation
        aspect = rng.uniform(0.5, 1.0)
        w, h = half, half * aspect
        if rng.random() < 0.5:
            w, h = h, w
        theta = rng.uniform(0, math.pi)
        pts = [(-w, -h), (w, -h), (w, h), (-w, h)]
    elif cls == 1:  # ellipse
        a, b = half, half * rng.uniform(0.5, 1.0)
        theta = rng.uniform(0, math.pi)
        n = max(12, min(40, int(size)))
        pts = [(a * math.cos(2 * math.pi * k / n), b * math.sin(2 * math.pi * k / n)) for k in range(n)]
    else:  # triangle
        theta = rng.uniform(0, 2 * math.pi)
        pts = [(half * math.cos(2 * math.pi * k / 3), half * math.sin(2 * math.pi * k / 3)) for k in range(3)]
    c, s = math.cos(theta), math.sin(theta)
    poly = []
    for x, y in pts:
        poly += [cx + c * x - s * y, cy + s * x + c * y]
    return poly


def _background(rng: np.random.Generator, size: int) -> np.ndarray:
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) / size
    base = rng.uniform(40, 200, size=3)
    grad = rng.uniform(-60, 60, size=(2, 3))
    img = base[None, None] + xx[..., None] * grad[0] + yy[..., None] * grad[1]
    img += rng.normal(0, 12, size=(size, size, 3))
    return img


def _render_image(rng: np.random.Generator, spec: SyntheticSpec) -> Tuple[np.ndarray, List[Dict]]:
    size = spec.image_size
    img = _background(rng, size)
    n_obj = int(rng.integers(1, spec.max_objects + 1))
    boxes, objects = [], []
    lo, hi = math.log(spec.min_size), math.log(spec.max_frac * size)
    for _ in range(n_obj * 10):  # rejection sampling for non-overlapping placement
        if len(objects) == n_obj:
            break
        cls = int(rng.integers(0, len(CLASSES)))
        extent = math.exp(rng.uniform(lo, hi))
        margin = extent / 2 + 1
        if margin * 2 >= size:
            continue
        cx, cy = rng.uniform(margin, size - margin, size=2)
        poly = _shape_polygon(rng, cls, cx, cy, extent)
        xs, ys = poly[0::2], poly[1::2]
        box = (min(xs), min(ys), max(xs), max(ys))
        if min(box) < 0 or max(box) > size or box[2] - box[0] < 2 or box[3] - box[1] < 2:
            continue
        if any(not (box[2] + 1 < b[0] or b[2] + 1 < box[0] or box[3] + 1 < b[1] or b[3] + 1 < box[1]) for b in boxes):
            continue
        boxes.append(box)
        mask_img = Image.new("L", (size, size), 0)
        ImageDraw.Draw(mask_img).polygon(poly, fill=255)
        mask = np.asarray(mask_img) > 0
        if mask.sum() < 4:
            boxes.pop()
            continue
        color = rng.uniform(0, 255, size=3)
        texture = rng.normal(0, rng.uniform(5, 30), size=(size, size, 3))
        img[mask] = (color[None] + texture[mask]).astype(np.float32)
        objects.append({"category_id": cls + 1, "polygon": poly, "bbox": box})
    return np.clip(img, 0, 255).astype(np.uint8), objects


def generate_split(out_dir: str, split: str, num_images: int, spec: SyntheticSpec) -> str:
    """Write ``num_images`` images of ``split`` under ``out_dir``; returns the annotation json path."""
    from pycocotools import mask as mask_utils

    split_seed = {"train": 0, "val": 1}[split]
    image_dir = os.path.join(out_dir, split)
    os.makedirs(image_dir, exist_ok=True)
    os.makedirs(os.path.join(out_dir, "annotations"), exist_ok=True)
    images, annotations = [], []
    ann_id = 1
    for idx in range(num_images):
        rng = np.random.default_rng([spec.seed, split_seed, idx])
        pixels, objects = _render_image(rng, spec)
        file_name = f"{idx:06d}.png"
        Image.fromarray(pixels).save(os.path.join(image_dir, file_name))
        image_id = idx + 1
        images.append({"id": image_id, "file_name": file_name, "height": spec.image_size, "width": spec.image_size})
        for obj in objects:
            x0, y0, x1, y1 = obj["bbox"]
            rle = mask_utils.frPyObjects([obj["polygon"]], spec.image_size, spec.image_size)
            area = float(mask_utils.area(mask_utils.merge(rle)))
            annotations.append(
                {
                    "id": ann_id,
                    "image_id": image_id,
                    "category_id": obj["category_id"],
                    "bbox": [round(x0, 3), round(y0, 3), round(x1 - x0, 3), round(y1 - y0, 3)],
                    "area": area,
                    "iscrowd": 0,
                    "segmentation": [[round(v, 3) for v in obj["polygon"]]],
                }
            )
            ann_id += 1
    coco = {
        "info": {"description": f"d2norm synthetic {split}", "version": str(_GENERATOR_VERSION)},
        "licenses": [],
        "images": images,
        "annotations": annotations,
        "categories": [{"id": i + 1, "name": n, "supercategory": "shape"} for i, n in enumerate(CLASSES)],
    }
    json_path = os.path.join(out_dir, "annotations", f"instances_{split}.json")
    with open(json_path, "w") as f:
        json.dump(coco, f)
    return json_path


def ensure_synthetic_dataset(root: str, spec: SyntheticSpec) -> str:
    """Generate the dataset for ``spec`` under ``root`` unless it exists; returns its directory.

    The directory name encodes the spec, so a changed spec never reuses stale files. Generation goes to a
    temporary directory that is renamed into place, so concurrent processes (one per rank) are safe.
    """
    final = os.path.join(os.path.abspath(root), f"synthetic_{spec.image_size}px_{spec.key()}")
    if os.path.isfile(os.path.join(final, "DONE")):
        return final
    os.makedirs(os.path.dirname(final), exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=".tmp_synthetic_", dir=os.path.dirname(final))
    try:
        generate_split(tmp, "train", spec.num_train, spec)
        generate_split(tmp, "val", spec.num_val, spec)
        with open(os.path.join(tmp, "spec.json"), "w") as f:
            json.dump({**asdict(spec), "generator_version": _GENERATOR_VERSION}, f, indent=1)
        open(os.path.join(tmp, "DONE"), "w").close()
        _normal_permissions(tmp)
        try:
            os.rename(tmp, final)
            logger.info("Generated synthetic dataset at %s", final)
        except OSError:
            if not os.path.isfile(os.path.join(final, "DONE")):
                raise
    finally:
        if os.path.isdir(tmp):
            shutil.rmtree(tmp, ignore_errors=True)
    return final


def _normal_permissions(directory: str) -> None:
    """``tempfile.mkdtemp`` creates its directory with mode 0700; give it (and its subdirectories) the mode of
    any directory the user creates (0777 minus the umask), as ``os.makedirs`` does for the rest of the tree."""
    umask = os.umask(0)
    os.umask(umask)
    for d, _, _ in os.walk(directory):
        os.chmod(d, 0o777 & ~umask)


def register_synthetic_dataset(root: str, spec: SyntheticSpec) -> Dict[str, str]:
    """Generate (if needed) and register ``d2norm_synthetic_{train,val}``; re-registers on a changed spec."""
    from detectron2.data import DatasetCatalog, MetadataCatalog
    from detectron2.data.datasets import register_coco_instances

    directory = ensure_synthetic_dataset(root, spec)
    for name, split in ((TRAIN_NAME, "train"), (VAL_NAME, "val")):
        json_file = os.path.join(directory, "annotations", f"instances_{split}.json")
        image_root = os.path.join(directory, split)
        if name in DatasetCatalog.list():
            if MetadataCatalog.get(name).get("json_file") == json_file:
                continue
            DatasetCatalog.remove(name)
            MetadataCatalog.remove(name)
        register_coco_instances(name, {}, json_file, image_root)
        MetadataCatalog.get(name).set(thing_classes=list(CLASSES), evaluator_type="coco")
    return {TRAIN_NAME: directory, VAL_NAME: directory}


NODE = "DATA"
OPTIONS = declare_node(NODE, (
    Option("SYNTHETIC_ROOT", "", "Root of the bundled synthetic COCO-format set (generated on first use); '' = "
           "$DETECTRON2_DATASETS/d2norm_synthetic ($DETECTRON2_DATASETS defaults to ./datasets, as detectron2's "
           "builtin datasets)."),
    Option("SYNTHETIC_IMAGE_SIZE", 128, "Image side in pixels.", check=Int(32)),
    Option("SYNTHETIC_NUM_TRAIN", 400, "Training images.", check=Int(1)),
    Option("SYNTHETIC_NUM_VAL", 100, "Validation images.", check=Int(1)),
    Option("SYNTHETIC_SEED", 0, "Seed of the generator (another seed = another data set).", check=Int(0)),
), doc="The bundled synthetic COCO-format set (d2norm_synthetic_train / _val)")


def synthetic_root(cfg) -> str:
    """Where the synthetic set lives: ``D2NORM.DATA.SYNTHETIC_ROOT`` when set, else
    ``$DETECTRON2_DATASETS/d2norm_synthetic`` with detectron2's default ``./datasets`` for the variable (the
    rule of detectron2's builtin datasets, ``detectron2/data/datasets/builtin.py``)."""
    root = cfg.D2NORM.DATA.SYNTHETIC_ROOT
    if root:
        return root
    return os.path.join(os.path.expanduser(os.getenv("DETECTRON2_DATASETS", "datasets")), "d2norm_synthetic")


def spec_from_cfg(cfg) -> SyntheticSpec:
    d = cfg.D2NORM.DATA
    return SyntheticSpec(
        image_size=d.SYNTHETIC_IMAGE_SIZE,
        num_train=d.SYNTHETIC_NUM_TRAIN,
        num_val=d.SYNTHETIC_NUM_VAL,
        seed=d.SYNTHETIC_SEED,
    )

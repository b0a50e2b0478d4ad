#!/usr/bin/env python
"""Draw a checkpoint's predictions on validation images and write them as PNGs.

Each image of ``--dataset`` (default: the cfg's first DATASETS.TEST) is read as detectron2 reads it, predicted
through detectron2's ``DefaultPredictor`` call (test-time resize of INPUT.MIN_SIZE_TEST / MAX_SIZE_TEST, the
cfg's INPUT.FORMAT, predictions at the original resolution) on the model loaded as the other tools load it
(d2norm's checkpointer: post-FrozenBN-switch and EvalNorm checkpoints too), and drawn with detectron2's
``Visualizer`` (boxes, class names and scores; masks when the model predicts them). Writes
``<output-dir>/<image name>.png`` for the first ``--num-images`` images and ``predictions.json`` with the drawn
instances (boxes in XYXY pixels of the original image, scores, class names).

Example:
    python tools/visualize.py --config-file configs/cpu/faster_rcnn_R18_FPN_ghostbn.yaml \\
        --weights output/cpu/faster_rcnn_R18_FPN_ghostbn/model_final.pth --num-images 8
"""
import os
import sys

import d2norm  # noqa: F401  (compat + registrations)
from d2norm.engine import cli as tc


def build_parser():
    p = tc.base_parser(__doc__)
    p.add_argument("--dataset", help="images to draw on (default: the cfg's first DATASETS.TEST)")
    p.add_argument("--num-images", type=tc.positive_int, default=8, help="first N images of the dataset (default 8)")
    p.add_argument("--score-threshold", type=float, default=0.5, help="draw predictions scoring at least this "
                   "(default 0.5)")
    p.add_argument("--max-detections", type=tc.positive_int, default=20, help="at most this many per image, "
                   "highest scores first (default 20)")
    return p


class _Predictor:
    """detectron2's ``DefaultPredictor`` on an already loaded model: its ``__call__`` (resize, input format,
    forward at the original size) unchanged; only its ``__init__``, which builds and loads the model with
    detectron2's own checkpointer, is replaced."""

    def __init__(self, cfg, model):
        from detectron2.data import transforms as T

        self.cfg = cfg.clone()
        self.model = model.eval()
        self.aug = T.ResizeShortestEdge([cfg.INPUT.MIN_SIZE_TEST, cfg.INPUT.MIN_SIZE_TEST], cfg.INPUT.MAX_SIZE_TEST)
        self.input_format = cfg.INPUT.FORMAT
        if self.input_format not in ("RGB", "BGR"):
            raise tc.ToolError(f"INPUT.FORMAT must be 'RGB' or 'BGR' for drawing, got {self.input_format!r}")

    def __call__(self, image):
        from detectron2.engine import DefaultPredictor

        return DefaultPredictor.__call__(self, image)


def run(args):
    from detectron2.data import DatasetCatalog, MetadataCatalog
    from detectron2.data.detection_utils import read_image
    from detectron2.utils.visualizer import Visualizer
    from PIL import Image

    if not 0.0 <= args.score_threshold <= 1.0:
        raise tc.ToolError(f"--score-threshold must be in [0, 1], got {args.score_threshold}")
    cfg = tc.load_cfg(args.config_file, args.opts)
    dataset = tc.prepare_dataset(cfg, args.dataset or tc.first(cfg.DATASETS.TEST))
    out_dir = tc.output_dir(args, cfg, "visualize")
    predictor = _Predictor(cfg, tc.load_model(cfg, args.weights))
    metadata = MetadataCatalog.get(dataset)
    names = metadata.get("thing_classes", None)
    os.makedirs(out_dir, exist_ok=True)
    report = {"dataset": dataset, "score_threshold": args.score_threshold, "images": []}
    for d in DatasetCatalog.get(dataset)[: args.num_images]:
        bgr = read_image(d["file_name"], format="BGR")  # DefaultPredictor's input convention
        inst = predictor(bgr)["instances"].to("cpu")
        inst = inst[inst.scores >= args.score_threshold]
        inst = inst[inst.scores.argsort(descending=True)[: args.max_detections]]
        vis = Visualizer(bgr[:, :, ::-1], metadata, scale=1.0).draw_instance_predictions(inst)
        name = os.path.splitext(os.path.basename(d["file_name"]))[0]
        path = os.path.join(out_dir, f"{name}.png")
        Image.fromarray(vis.get_image()).save(path)
        report["images"].append({
            "file_name": d["file_name"], "png": path,
            "boxes": inst.pred_boxes.tensor.tolist(), "scores": inst.scores.tolist(),
            "classes": [names[c] if names else int(c) for c in inst.pred_classes.tolist()],
        })
        print(f"{path}: {len(inst)} prediction(s)", flush=True)
    json_path = tc.write_json(os.path.join(out_dir, "predictions.json"), report)
    print(f"wrote {len(report['images'])} image(s) and {json_path}", flush=True)
    return report


def main(argv=None) -> int:
    return tc.run_tool(run, build_parser(), argv)


if __name__ == "__main__":
    sys.exit(main())

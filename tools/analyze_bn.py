#!/usr/bin/env python
"""BN diagnostics for one or more checkpoints: PNG plots and a JSON report.

(a) rethinking §3.1, Fig. 2: for chosen channels of chosen BN layers, across the checkpoints, the EMA mean
    (red), the means of ``--num-batches`` mini-batches forwarded in training mode (blue dots) and the
    population mean (blue line: the simple average of the batch means, as in Fig. 2's caption; the eq-2
    statistic of the same batches is in the JSON). Same batches for every checkpoint. -> ``fig2_batch_stats.png``
(b) estimation-shift Def. 2: ESM_μ = ‖μ̂ − μ̃‖₂ and ESM_σ = ‖σ̂ − σ̃‖₂ of every BN layer, ordered by depth,
    where μ̃, σ̃² are the expected population statistics (Def. 1) measured by forwarding the test set
    (``--test-dataset``) through the model in eval mode: the accumulation of estimation shift with depth
    (§4.2.1); the L² norm grows like √C with the layer's width C, so the per-channel values ESM/√C are plotted
    too (bottom row), layer names on the x axis. -> ``esm.png``
All numbers the plots are drawn from are in ``analyze_bn.json``.

Example:
    python tools/analyze_bn.py --config-file configs/cpu/retinanet_R18_ghostbn.yaml \\
        --weights output/x/model_0000199.pth output/x/model_0000399.pth output/x/model_final.pth
"""
import os
import sys

import d2norm  # noqa: F401  (compat + registrations)
from d2norm.engine import cli as tc


def build_parser():
    p = tc.base_parser(__doc__, multi_weights=True)
    p.add_argument("--train-dataset", help="data of the training-mode batches (default: first DATASETS.TRAIN)")
    p.add_argument("--test-dataset", help="test set S' of the expected statistics (default: first DATASETS.TEST)")
    p.add_argument("--num-batches", type=tc.positive_int, default=100, help="mini-batches per checkpoint (Fig. 2: 100)")
    p.add_argument("--batch-size", type=tc.positive_int, help="images per mini-batch (default SOLVER.IMS_PER_BATCH)")
    p.add_argument("--layers", nargs="+", help="BN layer names for (a) (default: first, middle and last)")
    p.add_argument("--channels", type=int, nargs="+", default=[0], help="channels for (a) (default 0)")
    p.add_argument("--esm-samples", type=tc.positive_int, help="test images for (b) (default: the whole test set)")
    p.add_argument("--output-name", default="analyze_bn", help="JSON name without .json")
    return p


def _label(path, extra, i):
    it = extra.get("iteration")
    return f"iter {it}" if isinstance(it, int) else os.path.splitext(os.path.basename(path))[0] or str(i)


def _default_layers(names):
    if len(names) <= 3:
        return list(names)
    return [names[0], names[len(names) // 2], names[-1]]


def plot_fig2(report):
    """rethinking Fig. 2 per (layer, channel) panel: the batch means (dots), their average (the population
    mean) and the EMA mean across the checkpoints; every panel with its axis labels and legend."""
    import matplotlib.pyplot as plt

    ckpts = report["checkpoints"]
    x = list(range(len(ckpts)))
    panels = [(n, c) for n in report["layers"] for c in report["channels"]]
    fig, axes = plt.subplots(len(panels), 1, figsize=(7, 2.8 * len(panels)), squeeze=False)
    for ax, (n, c) in zip(axes[:, 0], panels):
        d = [ck["fig2"][n][str(c)] for ck in ckpts]
        for xi, di in zip(x, d):
            ax.scatter([xi] * len(di["batch_means"]), di["batch_means"], s=6, c="tab:blue", alpha=0.35,
                       label=f"mean of each of {len(di['batch_means'])} batches" if xi == 0 else None)
        ax.plot(x, [di["population_mean"] for di in d], "-o", c="tab:blue", label="population mean")
        ax.plot(x, [di["ema_mean"] for di in d], "-s", c="tab:red", label="EMA mean (running_mean)")
        ax.set_title(f"{n}, channel {c}", fontsize=9)
        ax.set_ylabel(f"mean of channel {c}", fontsize=8)
        ax.set_xlabel("checkpoint", fontsize=8)
        ax.set_xticks(x)
        ax.set_xticklabels([ck["label"] for ck in ckpts], fontsize=8)
        ax.legend(fontsize=7)
    fig.tight_layout()
    return fig


def plot_esm(report):
    """estimation-shift Def. 2 per layer in depth order, layer names on the x axis: raw ESM_μ, ESM_σ (L² norm
    over the layer's C channels, top) and per channel ESM/√C (bottom), so layers of different width compare;
    every panel with its axis labels and a legend of the checkpoints."""
    import matplotlib.pyplot as plt

    ckpts = report["checkpoints"]
    names = [e["layer"] for e in ckpts[0]["esm"]] if ckpts else []
    fig, axes = plt.subplots(2, 2, figsize=(max(11, 0.32 * len(names) + 3), 9), squeeze=False)
    rows = (("", "L2 norm over channels"), ("_rms", "per channel: ESM / sqrt(C)"))
    for r, (suffix, what) in enumerate(rows):
        for col, (key, sym) in enumerate((("esm_mu", "ESM_mu"), ("esm_sigma", "ESM_sigma"))):
            ax = axes[r, col]
            for ck in ckpts:
                by_name = {e["layer"]: e[key + suffix] for e in ck["esm"]}
                ax.plot(range(len(names)), [by_name.get(n, float("nan")) for n in names], "-o", ms=3,
                        label=ck["label"])
            ax.set_title(f"{sym}, {what} (test set {report['test_dataset']})", fontsize=9)
            ax.set_ylabel(f"{sym}{' / sqrt(C)' if suffix else ''}", fontsize=8)
            ax.set_xlabel("BN layer (depth order)", fontsize=8)
            ax.set_xticks(range(len(names)))
            ax.set_xticklabels(names, rotation=90, fontsize=6)
            ax.legend(fontsize=7, title="checkpoint", title_fontsize=7)
    fig.tight_layout()
    return fig


def run(args):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from d2norm.stats.esm import model_layer_esm
    from d2norm.stats.probe import batch_statistics, expected_population_stats, probed_layers

    cfg = tc.load_cfg(args.config_file, args.opts)
    train_ds = tc.prepare_dataset(cfg, args.train_dataset or tc.first(cfg.DATASETS.TRAIN))
    test_ds = tc.prepare_dataset(cfg, args.test_dataset or tc.first(cfg.DATASETS.TEST))
    batch_size = args.batch_size or cfg.SOLVER.IMS_PER_BATCH
    out_dir = tc.output_dir(args, cfg, "analyze_bn")
    tc.claim_outputs([os.path.join(out_dir, f"{args.output_name}.json")], args.overwrite)
    for w in args.weights:  # fail before any work
        if not os.path.isfile(w) and "://" not in w:
            raise tc.ToolError(f"checkpoint not found: {w!r}")

    report = {"train_dataset": train_ds, "test_dataset": test_ds, "num_batches": args.num_batches,
              "batch_size": batch_size, "channels": args.channels, "checkpoints": []}
    layers = None
    for i, w in enumerate(args.weights):
        model, extra = tc.load_model(cfg, w, return_checkpoint=True)
        names = list(probed_layers(model))
        if not names:
            raise tc.ToolError("the model has no BN layer with population statistics")
        if layers is None:
            layers = args.layers or _default_layers(names)
            bad = [n for n in layers if n not in names]
            if bad:
                raise tc.ToolError(f"unknown BN layer(s) {bad}; BN layers of this model: {names}")
            widths = {n: probed_layers(model)[n].num_features for n in layers}
            bad_c = [c for c in args.channels if any(c < 0 or c >= widths[n] for n in layers)]
            if bad_c:
                raise tc.ToolError(f"channel(s) {bad_c} out of range for layers with {widths} channels")
            report["layers"] = layers
        label = _label(w, extra, i)
        print(f"[{i + 1}/{len(args.weights)}] {label}: {args.num_batches} training-mode batches of {batch_size} "
              f"from {train_ds!r}", flush=True)
        loader = tc.train_style_loader(cfg, train_ds, batch_size, seed=args.seed)
        bstats = batch_statistics(model, loader, args.num_batches, batch_size, layers=layers)
        print(f"[{i + 1}/{len(args.weights)}] {label}: expected statistics on {test_ds!r}", flush=True)
        expected = expected_population_stats(model, tc.test_loader(cfg, test_ds), num_samples=args.esm_samples)
        esm = model_layer_esm(model, expected)
        fig2 = {}
        for n in layers:
            s = bstats[n]
            pop = s.population[0]
            fig2[n] = {
                str(c): {
                    "ema_mean": float(s.ema_mean[0, c]),
                    "batch_means": [float(v) for v in s.batch_means[:, 0, c]],
                    "population_mean": float(s.mean_of_batch_means[0, c]),
                    "eq2_mean": None if pop is None else float(pop.mean[c]),
                    "ema_var": float(s.ema_var[0, c]),
                    "batch_vars": [float(v) for v in s.batch_vars[:, 0, c]],
                    "eq2_var": None if pop is None else float(pop.var[c]),
                }
                for c in args.channels
            }
        report["checkpoints"].append({"weights": w, "label": label, "fig2": fig2, "esm": esm,
                                      "esm_test_images": expected.num_samples})

    # ---- plots ----------------------------------------------------------------------------------------
    os.makedirs(out_dir, exist_ok=True)
    fig2_path = os.path.join(out_dir, "fig2_batch_stats.png")
    fig = plot_fig2(report)
    fig.savefig(fig2_path, dpi=80)
    plt.close(fig)
    esm_path = os.path.join(out_dir, "esm.png")
    fig = plot_esm(report)
    fig.savefig(esm_path, dpi=80)
    plt.close(fig)

    report["plots"] = {"fig2": fig2_path, "esm": esm_path}
    path = tc.write_json(os.path.join(out_dir, f"{args.output_name}.json"), report)
    for ck in report["checkpoints"]:
        rows = [[e["depth"], e["layer"], e["num_channels"], e["esm_mu"], e["esm_sigma"], e["esm_mu_rms"],
                 e["esm_sigma_rms"]] for e in ck["esm"]]
        print(f"{ck['label']}: ESM per layer (first / last 3)")
        print(tc.format_table(["depth", "layer", "C", "ESM_mu", "ESM_sigma", "ESM_mu/sqrt(C)", "ESM_sigma/sqrt(C)"],
                              rows[:3] + rows[-3:]))
    print(f"wrote {fig2_path}, {esm_path}, {path}", flush=True)
    return report


def main(argv=None) -> int:
    return tc.run_tool(run, build_parser(), argv)


if __name__ == "__main__":
    sys.exit(main())

#!/usr/bin/env python
"""Speed tables (markdown) and a bar plot (PNG) from the JSON of benchmark_norms.py and benchmark_models.py.

With ``--readme docs/speed.md`` the block between ``<!-- bench:begin -->`` and ``<!-- bench:end -->`` is replaced
by the regenerated tables (shape, threads, date, command and load come from the JSON files).

    python tools/bench_report.py bench/norms.json bench/models.json [bench/models_384.json ...] --png bench/norms.png \
        --readme docs/speed.md
"""
import argparse
import json
import sys

BEGIN, END = "<!-- bench:begin -->", "<!-- bench:end -->"


def _ratio(row, key, digits=2):
    """``median [q25–q75]``: a benchmark ratio with its interquartile range (the median alone for JSON written
    before the IQR was recorded)."""
    if key + "_iqr" not in row:
        return f"{row[key]:.{digits}f}"
    lo, hi = row[key + "_iqr"]
    return f"{row[key]:.{digits}f} [{lo:.{digits}f}–{hi:.{digits}f}]"


def norms_tables(doc):
    lines = []
    for r in doc["results"]:
        b = r["baseline"]["BatchNorm2d"]
        gn = r["baseline"]["GroupNorm"]
        lines += [
            f"**Layers, shape {tuple(r['shape'])}** — {r['device']}, {r['threads']} thread(s), {r['clock']} clock, "
            f"{r['rounds']} interleaved rounds of ~{r['window_ms']:g} ms samples; ratio = median of the per-round "
            f"ratios [interquartile range], times = best round; 1-min load {r['loadavg_1min'][0]:.1f}→"
            f"{r['loadavg_1min'][1]:.1f}. `nn.BatchNorm2d`: train {b['train_ms']:.2f} ms, eval {b['eval_ms']:.3f} ms "
            f"({b['eval_GBps']:.1f} GB/s); `nn.GroupNorm({gn['groups']})`: train {gn['train_ms']:.2f} ms, eval "
            f"{gn['eval_ms']:.3f} ms.",
            "",
            "| layer | train fwd+bwd / BN | eval / BN | eval GB/s (x read + y write) |",
            "|---|---|---|---|",
        ]
        for name, v in r["layers"].items():
            t = _ratio(v, "train_ratio")
            e = _ratio(v, "eval_ratio")
            if "train_ratio_vs_groupnorm" in v:
                t += f" ({v['train_ratio_vs_groupnorm']:.2f} × GroupNorm)"
                e += f" ({v['eval_ratio_vs_groupnorm']:.2f} × GroupNorm)"
            lines.append(f"| {name} | {t} | {e} | {v['eval_GBps']:.1f} |")
        lines.append("")
    return lines


def models_tables(doc):
    lines = []
    for name, r in doc["models"].items():
        lines += [
            f"**{name}** (`{r['config']}`, {r['image_size']} px, {r['ims_per_batch']} images/iteration, "
            f"{doc['threads']} thread(s), {doc['rounds']} interleaved rounds; ratio = median of the per-round ratios "
            f"[interquartile range]): BN trains at {r['BN']['train_it_s']:.2f} it/s and infers "
            f"{r['BN']['infer_img_s']:.1f} img/s (best round).",
            "",
            "| backbone norm | training it/s vs BN | inference img/s vs BN |",
            "|---|---|---|",
        ]
        for key, row in r["norms"].items():
            t = _ratio(row, "train_ratio") if "train_ratio" in row else "—"
            inf = _ratio(row, "infer_ratio")
            if "infer_vs_no_norm" in row:
                inf += (f" ({_ratio(row, 'infer_vs_no_norm', 3)} × no-norm model; {row['folded']} folded, "
                        f"{row['not_folded']} left)")
            label = key.replace("+fold", " folded") if key != "none" else "none (no norm)"
            lines.append(f"| {label} | {t} | {inf} |")
        pb = r["precise_bn"]
        lines += ["", f"PreciseBN (N={pb['num_samples']}, B={pb['batch_size']}; f = {pb['forward_s_per_image']*1e3:.1f} "
                  f"ms/image forward, g = {pb['train_s_per_image']*1e3:.1f} ms/image training):", ""]
        for tag, c in pb["schedules"].items():
            lines.append(f"- {tag}: {c['passes']} pass(es) over {c['max_iter']} iterations × {c['ims_per_batch']} images "
                         f"→ **{c['cost_percent']:.3f}%** of training")
        lines.append("")
    return lines


def plot(norms_doc, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    results = norms_doc["results"]
    fig, axes = plt.subplots(1, len(results), figsize=(6.5 * len(results), 4.2), squeeze=False)
    for ax, r in zip(axes[0], results):
        names = list(r["layers"])
        xs = range(len(names))
        w = 0.4
        ax.bar([x - w / 2 for x in xs], [r["layers"][n]["train_ratio"] for n in names], w, label="train fwd+bwd")
        ax.bar([x + w / 2 for x in xs], [r["layers"][n]["eval_ratio"] for n in names], w, label="eval")
        ax.axhline(1.0, color="k", lw=0.8)
        ax.set_xticks(list(xs))
        ax.set_xticklabels(names, rotation=35, ha="right")
        ax.set_ylabel("time / nn.BatchNorm2d")
        ax.set_title(f"shape {tuple(r['shape'])}, {r['threads']} thread(s)")
        ax.legend()
    fig.suptitle(f"d2norm layers vs BatchNorm2d ({norms_doc['date']})")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("norms_json")
    p.add_argument("models_json", nargs="*", help="benchmark_models.py JSON files (e.g. one per image size)")
    p.add_argument("--png", default=None)
    p.add_argument("--readme", default=None)
    args = p.parse_args(argv)
    with open(args.norms_json) as f:
        norms = json.load(f)
    lines = [f"Measured {norms['date']} with `{norms['command']}` (torch {norms['torch']}):", ""] + norms_tables(norms)
    for path in args.models_json:
        with open(path) as f:
            models = json.load(f)
        lines += [f"Measured {models['date']} with `{models['command']}` (1-min load "
                  f"{models['loadavg_1min'][0]:.1f}→{models['loadavg_1min'][1]:.1f}):", ""] + models_tables(models)
    if args.png:
        plot(norms, args.png)
        lines += [f"![layer speed vs BatchNorm2d]({args.png})", ""]
    text = "\n".join(lines)
    if args.readme:
        with open(args.readme) as f:
            readme = f.read()
        if BEGIN not in readme or END not in readme:
            p.error(f"{args.readme} has no {BEGIN} ... {END} block to replace")
        head, rest = readme.split(BEGIN, 1)
        _, tail = rest.split(END, 1)
        with open(args.readme, "w") as f:
            f.write(head + BEGIN + "\n" + text + "\n" + END + tail)
        print(f"updated {args.readme}")
    else:
        sys.stdout.write(text + "\n")


if __name__ == "__main__":
    main()

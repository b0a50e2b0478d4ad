#!/usr/bin/env python
"""Speed tables (markdown) and a bar plot (PNG) from the JSON of benchmark_norms.py and benchmark_models.py, and
the GPU section from tools/gpu_selfcheck.py's JSON.

With ``--readme docs/speed.md`` the block between ``<!-- bench:begin -->`` and ``<!-- bench:end -->`` is replaced
by the regenerated tables (shape, threads, date, command and load come from the JSON files); with ``--gpu`` the
block between ``<!-- gpu:begin -->`` and ``<!-- gpu:end -->`` by the GPU check's results (every check's outcome,
the speed and peak-memory ratios against the issue's targets, the AMP detectors, torch.compile).

    python tools/bench_report.py bench/norms.json bench/models.json [bench/models_384.json ...] --png bench/norms.png \
        --readme docs/speed.md
    python tools/bench_report.py --gpu results/gpu/gpu_selfcheck.json --readme docs/speed.md
"""
import argparse
import json
import sys

BEGIN, END = "<!-- bench:begin -->", "<!-- bench:end -->"
GPU_BEGIN, GPU_END = "<!-- gpu:begin -->", "<!-- gpu:end -->"
#: the targets a GPU run is read against: layer train fwd+bwd / cuDNN BN, eval / BN (affine inference; layers with
#: per-sample statistics at inference get EVAL_PER_SAMPLE), detector s/iter / the BN detector's (it/s >= 0.9x)
TRAIN_TARGET, EVAL_AFFINE_TARGET, EVAL_PER_SAMPLE_TARGET, DETECTOR_TARGET = 1.3, 1.1, 2.0, 1 / 0.9
SYNCBN_TARGET = 1.1  # AnySyncBN's training step / torch SyncBatchNorm's


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


def _mark(value, target):
    return f"{value:.2f}" + ("" if value <= target else " ✗")


def gpu_tables(doc):
    """Markdown of one gpu_selfcheck.json: environment, every check's outcome, then what the measurements say
    against the targets (✗ marks a ratio over its target)."""
    env = doc["environment"]
    lines = [f"GPU check on **{env['device']}** ({env['gpus']} GPU(s)), torch {env['torch']}, Python "
             f"{env['python']}{', ' + env['date'] if env.get('date') else ''}"
             f"{' — DRY RUN on the CPU (toy sizes: no GPU number)' if env.get('dry_run') else ''}.", "",
             "| check | result | wall s |", "|---|---|---|"]
    for c in doc.get("checks", []):
        res = "skipped: " + c["skipped"] if c.get("ok") is None else ("ok" if c["ok"] else
                                                                          f"FAIL ({len(c['failures'])}): "
                                                                          + c["failures"][0].splitlines()[0][:160])
        lines.append(f"| {c['check']} | {res} | {c.get('wall_s', '')} |")
    lines.append("")
    for c in doc.get("checks", []):
        data = c.get("data")
        if not data:
            continue
        if isinstance(data, list):  # benchmark_norms results
            for r in data:
                amp = r.get("amp") or "fp32"
                lines += [f"**Layers, {tuple(r['shape'])}, {amp}** (targets: train ≤ {TRAIN_TARGET}× BN, eval ≤ "
                          f"{EVAL_AFFINE_TARGET}× for an affine inference, ≤ {EVAL_PER_SAMPLE_TARGET}× with "
                          "per-sample statistics; ✗ = over)", "",
                          "| layer | train / BN | eval / BN | train peak mem / BN | eval peak mem / BN |",
                          "|---|---|---|---|---|"]
                for name, v in r["layers"].items():
                    et = EVAL_PER_SAMPLE_TARGET if v.get("eval_per_sample") else EVAL_AFFINE_TARGET
                    mem = [f"{v[k]:.2f}" if k in v else "not measured" for k in ("train_peak_ratio",
                                                                                  "eval_peak_ratio")]
                    lines.append(f"| {name} | {_mark(v['train_ratio'], TRAIN_TARGET)} | "
                                 f"{_mark(v['eval_ratio'], et)} | {mem[0]} | {mem[1]} |")
                lines.append("")
        elif "sync_bn_timing" in data:  # 2 processes: AnySyncBN vs torch's SyncBatchNorm
            t = data["sync_bn_timing"]
            ratios = t.get("ratio_vs_torch_syncbn", {})
            lines += [f"**AnySyncBN vs torch SyncBatchNorm, 2 processes ({t.get('backend')}), {tuple(t['shape'])} per "
                      f"rank** (target: ≤ {SYNCBN_TARGET}× torch's)", "", "| layer | s/step | / nn.SyncBatchNorm |",
                      "|---|---|---|"]
            for name, v in t["s_per_step"].items():
                cell = f"{v:.5f}" if isinstance(v, float) else v
                r = _mark(ratios[name], SYNCBN_TARGET) if name in ratios else "—"
                lines.append(f"| {name} | {cell} | {r} |")
            lines.append("")
        elif "norms" in data:  # detectors under AMP
            lines += [f"**Detectors, AMP {data['dtype']} training at {data['image_size']} px** (target: s/iter ≤ "
                      f"{DETECTOR_TARGET:.2f}× the BN detector's)", "",
                      "| backbone norm | s/iter | / BN | GradScaler skipped steps | peak MiB |", "|---|---|---|---|---|"]
            for name, v in data["norms"].items():
                peak = f"{v['peak_MiB']:.0f}" if "peak_MiB" in v else "not measured"
                lines.append(f"| {name} | {v['s_per_iter']:.4f} | {_mark(v.get('ratio_vs_BN', 1.0), DETECTOR_TARGET)}"
                             f" | {v['skipped_steps']} | {peak} |")
            lines.append("")
        elif "layers" in data:  # torch.compile
            lines += [f"**torch.compile ({data['backend']}) vs eager** (compiled / eager time; < 1 = compile wins)",
                      "", "| layer | first call s | recompiles | graph breaks | train / eager per shape | "
                      "eval / eager per shape |", "|---|---|---|---|---|---|"]
            for name, v in data["layers"].items():
                if "skipped" in v:
                    lines.append(f"| {name} | skipped: {v['skipped']} | | | | |")
                    continue
                tr = ", ".join(f"{k}: {e['train_ratio']:.2f}" for k, e in v["shapes"].items() if "train_ratio" in e)
                ev = ", ".join(f"{k}: {e['eval_ratio']:.2f}" for k, e in v["shapes"].items() if "eval_ratio" in e)
                first = f"{v['first_call_s']:.1f}" if "first_call_s" in v else "—"
                lines.append(f"| {name} | {first} | {v['recompiles']} | {v['graph_breaks']} | {tr} | {ev} |")
            lines.append("")
    return lines


def replace_block(path, begin, end, text):
    """Replace the text between the markers ``begin`` and ``end`` of file ``path``; False when it has none."""
    with open(path) as f:
        doc = f.read()
    if begin not in doc or end not in doc:
        return False
    head, rest = doc.split(begin, 1)
    _, tail = rest.split(end, 1)
    with open(path, "w") as f:
        f.write(head + begin + "\n" + text + "\n" + end + tail)
    return True


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("norms_json", nargs="?", help="benchmark_norms.py JSON (not with --gpu)")
    p.add_argument("models_json", nargs="*", help="benchmark_models.py JSON files (e.g. one per image size)")
    p.add_argument("--png", default=None)
    p.add_argument("--readme", default=None)
    p.add_argument("--gpu", default=None, metavar="JSON", help="tools/gpu_selfcheck.py's gpu_selfcheck.json: write "
                   f"the GPU section (into --readme's {GPU_BEGIN} ... {GPU_END} block)")
    args = p.parse_args(argv)
    if args.gpu:
        if args.norms_json or args.models_json or args.png:
            p.error("--gpu takes no benchmark JSON files and no --png (one section per call)")
        with open(args.gpu) as f:
            _emit(p, args.readme, GPU_BEGIN, GPU_END, "\n".join(gpu_tables(json.load(f))))
        return
    if not args.norms_json:
        p.error("give a benchmark_norms.py JSON file, or --gpu gpu_selfcheck.json")
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
    _emit(p, args.readme, BEGIN, END, "\n".join(lines))


def _emit(parser, readme, begin, end, text):
    """``text`` into ``readme``'s ``begin`` ... ``end`` block, or to stdout without ``readme``."""
    if not readme:
        sys.stdout.write(text + "\n")
        return
    if not replace_block(readme, begin, end, text):
        parser.error(f"{readme} has no {begin} ... {end} block to replace")
    print(f"updated {readme}")


if __name__ == "__main__":
    main()

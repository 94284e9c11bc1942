"""bench/paper_digits_report.py: the tables and plots of bench/paper_digits.py, from what its phases wrote.

Every number of a synthetic set is first reduced per training seed (a classifier's F1: the mean over its
--eval-seeds classifier seeds), then summarised over the training seeds as mean ± sample std (ddof 1; n = the
number of seeds). CLUE - vanilla is paired: the difference per training seed (the two models of one seed share
the data, the VAE, the sampling seed and the classifier seeds), then its mean ± std. With --frontier, each
point's means over seeds give the two plots (precision against recall, F1 against recall, one curve per knob),
and every CLUE point is set against vanilla's best knob at the same precision, per training seed (matched_precision).
"""
from __future__ import annotations

import itertools
import json
import os
import platform
import sys
from pathlib import Path

import numpy as np


# The paper's numbers (PAPER.md; otoscopic images, Inception features: a different scale, for orientation only).
PAPER = {"fid": (46.81, 9.30), "recall": (0.4960, 0.7029), "syn_test_1000": (0.7383, 0.8321),
         "real+syn_test": (None, 0.9476), "syn_external_1000": (0.6061, 0.7677), "real+syn_external": (None, 0.8578)}
METRICS = [("fid", "FID ↓ (classifier features, vs real test)"), ("precision", "k-NN precision (k=3)"),
           ("recall", "k-NN recall (k=3)"), ("density", "density (k=5)"), ("coverage", "coverage (k=5)"),
           ("memorised", "memorised fraction (vs the limited train set)")]


def read_json(path: Path):
    return json.loads(path.read_text()) if path.is_file() else None


def scores(folder: Path, name: str) -> dict:
    """One synthetic set of one seed -> {metric key: value}: the k-NN/FID metrics, memorisation and every F1
    (keys "syn_test_100", "real+syn_external", "real_test", ...: the classify arm, the test set, the scale)."""
    m, c = read_json(folder / "metrics" / name / "metrics.json"), read_json(folder / "classify" / name /
                                                                              "classify.json")
    out = {k: m.get(k) for k, _ in METRICS[:5]} if m else {}
    if m and m.get("memorisation"):
        out["memorised"] = m["memorisation"]["memorised_fraction"]
    for a in (c or {}).get("arms", []):
        kind = {"synthetic": "syn", "real": "real", "real+synthetic": "real+syn"}[a["arm"]]
        for test in ("test", "external"):
            if a.get(test):
                out[f"{kind}_{test}" + (f"_{a['scale_percent']}" if kind == "syn" else "")] = a[test]["mean"]
    s = read_json(folder / "synthetic" / name / "run.json")
    out["n_synthetic"] = s["n_files"] if s else None
    return out


def summary(values: list) -> dict | None:
    v = np.array([x for x in values if x is not None], dtype=float)
    if not len(v):
        return None
    return {"mean": float(v.mean()), "std": float(v.std(ddof=1)) if len(v) > 1 else None, "n": int(len(v)),
            "values": v.tolist()}


def paired(a: list, b: list) -> dict | None:
    """a - b per seed where both exist, summarised."""
    return summary([x - y for x, y in zip(a, b) if x is not None and y is not None])


def collect(args, plan: dict) -> dict:
    """plan (paper_digits.plan_of): {"seeds", "arms", "points", "curves", "external"}."""
    out, seeds = Path(args.out).resolve(), plan["seeds"]
    res = {"training_seeds": seeds, "arms": {}, "paired_minus_vanilla": {}, "frontier": {}}
    per_seed = {a["name"]: [scores(out / f"s{s}", a["name"]) for s in seeds] for a in plan["arms"]}
    keys = sorted({k for runs in per_seed.values() for r in runs for k in r if k != "n_synthetic"})
    for a in plan["arms"]:
        runs = per_seed[a["name"]]
        res["arms"][a["name"]] = {"label": a["label"], "model": a["model"], "style_flags": a["style"],
                                  "per_seed": dict(zip(map(str, seeds), runs)),
                                  "summary": {k: summary([r.get(k) for r in runs]) for k in keys}}
        if a["name"] != "vanilla":
            res["paired_minus_vanilla"][a["name"]] = {
                k: paired([r.get(k) for r in runs], [r.get(k) for r in per_seed["vanilla"]]) for k in keys}
    if args.frontier:
        points, curves = plan["points"], plan["curves"]
        for pid in points:
            arm = plan["shared"].get(pid)  # a main-table set: its scores (F1 over its --eval-seeds classifiers)
            runs = [scores(out / f"s{s}", arm) if arm else scores(out / f"s{s}" / "frontier", pid)
                    for s in seeds[:args.frontier_seeds]]
            res["frontier"][pid] = {**points[pid], "per_seed": dict(zip(map(str, seeds), runs)), "summary": {
                k: summary([r.get(k) for r in runs]) for k in sorted({k for r in runs for k in r})}}
        res["frontier_curves"] = curves
        f1s = [f"syn_{t}_{args.frontier_scale}" for t in ("test", *(["external"] if args.external else []))]
        res["matched_keys"] = ["recall", *f1s, "fid"]
        res["matched_precision"] = matched_precision(res["frontier"], curves, seeds[:args.frontier_seeds],
                                                     tuple(res["matched_keys"]))
    res["reference"] = {"real_limited_vs_test": read_json(out / "metrics" / "real_limited" / "metrics.json")}
    feat = read_json(out / "feature_classifier" / "config.json")
    res["reference"]["feature_classifier"] = feat and {
        k: feat.get(k) for k in ("trained_on", "seed", "classifier", "recipe")} | {
        "test": feat.get("test") and {k: feat["test"][k] for k in ("macro_f1", "accuracy")}}
    ext = plan["external"]
    res["reference"]["external"] = ext and {"folder": str(ext), "manifest": (read_json(ext / "manifest.json") or {})
                                            .get("source")}
    res["training"] = {f"{m}_s{s}": read_json(out / f"s{s}" / "runs" / m / "summary.json")
                       for s in seeds for m in ("vanilla", "clue")}
    res["real_limited"] = read_json(out / "real_limited.json")
    return res


def at_precision(points: list[dict], prec: float, keys: tuple) -> dict | None:
    """A vanilla curve (its points' scores in knob order) read at precision `prec`: each of `keys` linear between the
    two neighbouring points whose precisions bracket `prec` (of several brackets, the one with the highest recall);
    None where the curve does not reach that precision."""
    best = None
    for a, b in itertools.pairwise([q for q in points if all(q.get(k) is not None for k in ("precision", *keys))]):
        if min(a["precision"], b["precision"]) <= prec <= max(a["precision"], b["precision"]):
            w = 0.0 if a["precision"] == b["precision"] else (prec - a["precision"]) / (b["precision"] - a["precision"])
            read = {k: a[k] + w * (b[k] - a[k]) for k in keys}
            best = read if best is None or read["recall"] > best["recall"] else best
    return best


def matched_precision(frontier: dict, curves: list, seeds: list, keys: tuple) -> list[dict]:
    """Every CLUE point against vanilla's best knob at the same precision, paired by training seed: per seed, the
    vanilla curve with the highest recall through the CLUE point's precision, read off by at_precision; then CLUE -
    vanilla of every key ("recall" first, F1s, FID) over the seeds where vanilla reaches that precision, and the
    pooled std of the two sides, sqrt((var CLUE + var vanilla) / 2), over those seeds."""
    rows, vanilla = [], [c for c in curves if c["model"] == "vanilla"]
    for c in (c for c in curves if c["model"] == "clue"):
        for value, pid in c["points"]:
            if pid in {r["point"] for r in rows}:  # a point on two curves (tau 1 at w, w_s 1): one row, the first
                continue
            mine, theirs = [], []
            for s in map(str, seeds):
                own = frontier[pid]["per_seed"].get(s) or {}
                if any(own.get(k) is None for k in ("precision", *keys)):
                    continue
                reads = [at_precision([frontier[p]["per_seed"].get(s) or {} for _, p in v["points"]],
                                      own["precision"], keys) for v in vanilla]
                if reads := [r for r in reads if r]:
                    mine.append(own)
                    theirs.append(max(reads, key=lambda r: r["recall"]))
            row = {"curve": c["label"], "knob": c["knob"], "value": value, "point": pid, "matched_seeds": len(mine),
                   "precision": summary([m["precision"] for m in mine]), "clue": {}, "vanilla": {}, "gain": {},
                   "pooled_std": {}}
            for k in keys:
                a, b = [m[k] for m in mine], [t[k] for t in theirs]
                row["clue"][k], row["vanilla"][k], row["gain"][k] = summary(a), summary(b), paired(a, b)
                row["pooled_std"][k] = float(np.sqrt((np.var(a, ddof=1) + np.var(b, ddof=1)) / 2)) \
                    if len(a) > 1 else None
            rows.append(row)
    return rows


def cell(s: dict | None, digits=3, sign=False) -> str:
    if not s:
        return "-"
    text = f"{s['mean']:+.{digits}f}" if sign else f"{s['mean']:.{digits}f}"
    return text + (f" ± {s['std']:.{digits}f}" if s.get("std") is not None else "")


def markdown(args, plan: dict, res: dict, phases: dict, wall: float) -> str:
    arms, n = plan["arms"], len(res["training_seeds"])
    clue_arms = [a for a in arms if a["name"] != "vanilla"]
    head = ("| metric | " + " | ".join(a["label"] for a in arms) + " | "
            + " | ".join(f"{a['label']} − vanilla (paired)" for a in clue_arms) + " | paper: vanilla / CLUE |")
    lines = [f"## CLUE vs vanilla fine-tuning on digits, {args.limit_per_class} real images per class, {n} training "
             f"seed(s)" + (f", both fine-tuned from a vanilla base pre-trained {args.pretrain_steps} steps on the "
                          "other train digits without labels" if args.pretrain_steps else "")
             + (" (--quick: smoke settings, not a result)" if args.quick else ""), "", head,
             "|---|" + "---|" * (len(arms) + len(clue_arms) + 1)]

    def row(label, key, digits=3, paper=None):
        ref = "" if paper is None else " / ".join("-" if v is None else f"{v:g}" for v in paper)
        lines.append(f"| {label} | " + " | ".join(cell(res["arms"][a["name"]]["summary"].get(key), digits)
                                                  for a in arms) + " | "
                     + " | ".join(cell(res["paired_minus_vanilla"][a["name"]].get(key), digits, True)
                                  for a in clue_arms) + f" | {ref} |")
    for key, label in METRICS:
        row(label, key, 2 if key == "fid" else 3, PAPER.get(key))
    tests = ["test"] + (["external"] if args.external else [])
    for test in tests:
        for s in args.scale_list:
            row(f"F1 {test}, synthetic only, {s} %", f"syn_{test}_{s}", paper=PAPER.get(f"syn_{test}_{s}"))
        row(f"F1 {test}, real + 100 % synthetic", f"real+syn_{test}", paper=PAPER.get(f"real+syn_{test}"))
        row(f"F1 {test}, real only ({args.limit_per_class * 10} images; the same runs in every column)",
            f"real_{test}")
    lines += ["", f"Mean ± std over {n} training seed(s) ({', '.join(map(str, res['training_seeds']))}: train.py "
              "--seed, with the sampling seed alongside; one VAE, one data subset); 'paired' columns: the difference "
              "per seed, then its mean ± std. F1: macro F1 on the digits test split"
              + (" and on the external set" if args.external else "") + f", per seed the mean over {args.eval_seeds} "
              f"classifier seed(s). Synthetic sets: {max(args.scale_list)} % of the real count per class, "
              f"{args.sample_steps} DDIM steps, guidance {args.guidance:g}. The paper's column is another dataset "
              "(otoscopy) with Inception features: for orientation only."]
    ref, feat, ext = (res["reference"][k] for k in ("real_limited_vs_test", "feature_classifier", "external"))
    if ref:
        lines += ["", f"Reference, the {ref['n_fake']} limited real training images vs the {ref['n_real']} test "
                  f"images: FID {ref['fid']:.2f}, precision {ref['precision']:.3f}, recall {ref['recall']:.3f}, "
                  f"density {ref['density']:.3f}, coverage {ref['coverage']:.3f} (k-NN metrics depend on set sizes)."]
    if feat and feat.get("test"):
        lines.append(f"Feature classifier (trained on the full train split): test macro F1 "
                     f"{feat['test']['macro_f1']:.3f}.")
    if ext:
        lines.append(f"External test set: {ext['folder']} ({ext['manifest'] or 'a folder given with --external'}); "
                     "made once, tuned to nothing.")
    for key, d in res["training"].items():
        diag = (d or {}).get("diagnostics") or {}
        if key.startswith("clue") and diag:
            lines.append(f"CLUE style latent, {key} (held-out): KL per dim {diag.get('kl_per_dim', 0):.4f}, active "
                         f"units {diag.get('active_units')}, denoising loss with the style from the encoder "
                         f"{diag.get('loss_encoder', 0):.4f}, prior {diag.get('loss_prior', 0):.4f}, aggregated "
                         f"posterior {diag.get('loss_aggregate', 0):.4f}, none {diag.get('loss_none', 0):.4f}.")
    if res["frontier"]:
        lines += frontier_markdown(args, res)
    groups = {}
    for name, rec in phases.items():
        g = ("frontier " if name.split("_")[1:2] and name.split("_")[1][:3] in ("fv-", "fc-") else "") \
            + name.split("_")[0]
        groups[g] = groups.get(g, 0.0) + rec.get("seconds", 0.0)
    lines += ["", "| phases | seconds |", "|---|---|"] + [f"| {g} | {t:.1f} |" for g, t in groups.items()]
    skipped = sum(bool(r.get("skipped_last_run")) for r in phases.values())
    lines += [f"| total of the phases | {sum(groups.values()):.1f} |",
              f"| this invocation (wall, --jobs {args.jobs}; {skipped} phases done earlier, skipped) | {wall:.1f} |",
              "",
              f"Settings: limit {args.limit_per_class}/class (data seed {args.data_seed}), {args.train_steps} steps "
              f"(VAE {args.vae_steps}{f', pre-training {args.pretrain_steps}' if args.pretrain_steps else ''}), "
              f"batch {args.batch_size}, style tokens {args.style_tokens}, train args "
              f"{args.train_args!r}{f', CLUE args {args.clue_args!r}' if args.clue_args else ''}, "
              f"tau {','.join(f'{t:g}' for t in args.taus)}, device {args.device}, "
              f"{args.threads} thread(s) per phase. Every command and phase time: the JSON beside this file."]
    return "\n".join(lines)


def frontier_markdown(args, res: dict) -> list[str]:
    stem = args.name
    f1 = f"syn_test_{args.frontier_scale}"
    extra = [f"syn_external_{args.frontier_scale}"] if args.external else []
    lines = ["", f"### Diversity-fidelity frontier ({args.frontier_seeds} training seed(s), {args.frontier_steps} DDIM "
             f"steps, {args.frontier_scale} % = {args.frontier_scale * args.limit_per_class // 10} images per point, "
             f"F1 synthetic only at {args.frontier_scale} %, {args.frontier_eval_seeds} classifier seed(s))", "",
             f"![precision against recall]({stem}_frontier_pr.png) ![F1 against recall]({stem}_frontier_f1.png)", "",
             "| curve | knob | precision | recall | density | coverage | FID | memorised | F1 test |"
             + (" F1 external |" if extra else ""), "|---|---|---|---|---|---|---|---|---|" + ("---|" if extra else "")]
    for c in res["frontier_curves"]:
        for value, pid in c["points"]:
            s = res["frontier"][pid]["summary"]
            lines.append(f"| {c['label']} | {c['knob']} = {value:g} | " + " | ".join(
                cell(s.get(k), 2 if k == "fid" else 3) for k in ("precision", "recall", "density", "coverage",
                                                                 "fid", "memorised", f1, *extra)) + " |")
    keys = res["matched_keys"]
    names = {"recall": "recall", "fid": "FID", **{f: f"F1 {f.split('_')[1]}" for f in keys[1:-1]}}
    lines += ["", "CLUE against vanilla's best knob at the same precision, paired by training seed: per seed, the "
              "vanilla curve with the highest recall through the CLUE point's precision (linear between its points); "
              "CLUE - vanilla as mean ± std over the seeds where vanilla reaches that precision, and beside each F1 "
              "two pooled standard deviations of the two sides (the issue's bar for a real difference):", "",
              "| CLUE point | seeds | precision | " + " | ".join(
                  f"{names[k]} CLUE − vanilla" + (" | 2 × pooled std" if k.startswith("syn_") else "")
                  for k in keys) + " |",
              "|---|---|---|" + "---|" * (len(keys) + sum(k.startswith("syn_") for k in keys))]
    for r in res["matched_precision"]:
        cells = []
        for k in keys:
            cells.append(cell(r["gain"][k], 2 if k == "fid" else 3, True))
            if k.startswith("syn_"):
                cells.append("-" if r["pooled_std"][k] is None else f"{2 * r['pooled_std'][k]:.3f}")
        lines.append(f"| {r['curve']}, {r['knob']} = {r['value']:g} | {r['matched_seeds']} | {cell(r['precision'])} | "
                     + (" | ".join(cells) if r["matched_seeds"] else "outside vanilla's precision range") + " |")
    return lines


def plot_frontier(args, res: dict, results: Path, stem: str) -> list[str]:
    import matplotlib  # lazy: a heavy import that only the plots need
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    f1, paths = f"syn_test_{args.frontier_scale}", []
    for y, ylabel, suffix in (("precision", "k-NN precision (k=3)", "pr"),
                              (f1, f"macro F1, synthetic only at {args.frontier_scale} %", "f1")):
        fig, ax = plt.subplots(figsize=(6.5, 4.5))
        for c, color in zip(res["frontier_curves"], ("C0", "C9", "C3", "C2", "C1")):
            pts = [(v, res["frontier"][p]["summary"]) for v, p in c["points"]]
            pts = [(v, s) for v, s in pts if s.get("recall") and s.get(y)]
            if not pts:
                continue
            ax.errorbar([s["recall"]["mean"] for _, s in pts], [s[y]["mean"] for _, s in pts],
                        xerr=[s["recall"]["std"] or 0 for _, s in pts], yerr=[s[y]["std"] or 0 for _, s in pts],
                        color=color, marker="o" if c["model"] == "clue" else "s", capsize=2,
                        ls="-" if c["model"] == "clue" else "--", label=c["label"])
            for v, s in pts:
                ax.annotate(f"{v:g}", (s["recall"]["mean"], s[y]["mean"]), fontsize=7, color=color,
                            xytext=(3, 3), textcoords="offset points")
        ax.set(xlabel="k-NN recall (k=3)", ylabel=ylabel, title=f"digits, {args.limit_per_class}/class, mean ± std "
               f"over {args.frontier_seeds} seed(s)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
        fig.tight_layout()
        path = results / f"{stem}_frontier_{suffix}.png"
        fig.savefig(path, dpi=120)
        plt.close(fig)
        paths.append(str(path))
    return paths


def write(args, plan: dict, phases: dict, wall: float) -> dict:
    """Collect, print the Markdown, and (unless --stop-after) write RESULTS/<stem>.md/.json and the plots."""
    import torch
    res = collect(args, plan)
    record = {"benchmark": "bench/paper_digits.py", "quick": args.quick, "settings": vars(args),
              "environment": {"python": platform.python_version(), "torch": torch.__version__,
                              "cpu_count": os.cpu_count(), "device": args.device, "threads": args.threads,
                              "jobs": args.jobs},
              "phases": phases, "wall_seconds_this_invocation": round(wall, 1),
              "work_folder": str(Path(args.out).resolve()), **res}
    text = markdown(args, plan, res, phases, wall)
    print(text)
    if args.stop_after:  # a partial table must not replace a finished one
        print(f"--stop-after {args.stop_after}: nothing written to {args.results_dir}; work folder {args.out}",
              file=sys.stderr)
        return record
    results, stem = Path(args.results_dir), args.name
    results.mkdir(parents=True, exist_ok=True)
    if res["frontier"]:
        record["plots"] = plot_frontier(args, res, results, stem)
    from checkpoint import atomic_write_json
    (results / f"{stem}.md").write_text(text + "\n")
    atomic_write_json(results / f"{stem}.json", json.loads(json.dumps(record, default=str)))
    print(f"wrote {results / (stem + '.md')} and .json{' and the frontier plots' if res['frontier'] else ''}; "
          f"work folder {args.out}", file=sys.stderr)
    return record

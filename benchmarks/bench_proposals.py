"""Importance-sampling proposals at equal numbers of directions: naive, Adam (paper settings), Adam (best γ/η on a
small grid), Fisher, and the defensive mixture, on the digits MLP and a tiny trained causal LM.

Prints log volume, Markov lower bound, bootstrap std and ESS per proposal. The Markov lower bound is valid for
every proposal, so a higher lower bound is a better-supported number; "best γ/η" is chosen by it (a selection
over the grid, so that row is optimistic by the log of the grid size at most).

    python benchmarks/bench_proposals.py [--directions 64]
"""
from __future__ import annotations

import argparse
import logging

import torch

from hfvolume import estimate_local_volume

GRID = [(g, e) for g in (0.25, 0.5, 1.0) for e in (1e-8, 1e-5, 1e-3)]


def tiny_lm():
    """A GPT-NeoX (~0.2M parameters) trained briefly with AdamW on structured synthetic token sequences."""
    from transformers import GPTNeoXConfig, GPTNeoXForCausalLM

    torch.manual_seed(0)
    cfg = GPTNeoXConfig(vocab_size=64, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                        intermediate_size=128, max_position_embeddings=64)
    model = GPTNeoXForCausalLM(cfg)
    gen = torch.Generator().manual_seed(0)
    starts = torch.randint(0, 64, (256, 1), generator=gen)
    steps = torch.randint(1, 4, (256, 1), generator=gen)
    seqs = (starts + steps * torch.arange(32)) % 64  # arithmetic progressions mod 64: learnable structure
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    model.train()
    for i in range(150):
        batch = seqs[(i * 16) % 240: (i * 16) % 240 + 16]
        opt.zero_grad()
        model(input_ids=batch, labels=batch).loss.backward()
        opt.step()
    model.eval()
    evals = [{"input_ids": seqs[240:256], "attention_mask": torch.ones_like(seqs[240:256])}]
    return model, evals, opt


def digits():
    from hfvolume.demo import train_digits_mlp

    trained = train_digits_mlp(epochs=30)
    return trained.model, trained.eval_batches(), trained.optimizer


def run_case(name, model, data, opt, n):
    common = dict(n_directions=n, progress=False, cutoff=1e-2)
    rows = [("naive", estimate_local_volume(model, data, **common))]
    rows.append(("adam γ=0.5 η=1e-5 (paper)", estimate_local_volume(
        model, data, preconditioner="adam", optimizer=opt, **common)))
    best = None
    for g, e in GRID:
        r = estimate_local_volume(model, data, preconditioner="adam", optimizer=opt,
                                  preconditioner_options={"exponent": g, "eps": e}, **common)
        if best is None or r.log_volume_lower_bound > best[1].log_volume_lower_bound:
            best = (f"adam γ={g} η={e:g} (best of grid)", r)
    rows.append(best)
    rows.append(("fisher γ=0.5", estimate_local_volume(model, data, preconditioner="fisher", **common)))
    rows.append(("adam paper + mixture α=0.25", estimate_local_volume(
        model, data, preconditioner="adam", optimizer=opt, mixture=0.25, **common)))
    for label, r in rows:
        print(f"| {name} | {label} | {r.log_volume:,.1f} | {r.log_volume_lower_bound:,.1f} | "
              f"{r.log_volume_std:,.1f} | {r.ess:.2f} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--directions", type=int, default=64)
    args = parser.parse_args()
    logging.getLogger("hfvolume").setLevel(logging.ERROR)  # the ESS warnings are what the table shows
    print(f"\n{args.directions} directions each, KL cutoff 1e-2, Gaussian prior (σ = RMS of the weights, origin)\n")
    print("| model | proposal | log volume (nats) | lower bound (95%) | bootstrap std | ESS |")
    print("|---|---|---|---|---|---|")
    run_case("digits MLP (D=8,970)", *digits(), args.directions)
    model, data, opt = tiny_lm()
    run_case(f"tiny NeoX LM (D={sum(p.numel() for p in model.parameters()):,})", model, data, opt,
             args.directions)


if __name__ == "__main__":
    main()

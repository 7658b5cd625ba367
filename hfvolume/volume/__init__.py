"""The functional core: the log prior mass of a behaviour region around a flat anchor θ0 ∈ R^D.

Everything here works on ``[D]`` tensors and a behaviour callable Δ; nothing knows about ``torch.nn`` modules,
Hugging Face, or how processes are launched. Modules, from the entry point down:

* ``estimator``: ``estimate_log_volume`` (validate → set up → check ranks agree → search phases → result);
* ``phases``: searching the directions of a run in two phases, and sharing them between processes;
* ``table``: the per-direction record of a run and the named rows it travels in between ranks;
* ``evaluation``: calling the behaviour at θ0 + t·w and counting forward passes;
* ``radius``: where Δ crosses the cutoff along a ray;
* ``priors``: the prior's mass along a ray; ``ray_integral``: the Gaussian prior's 1-D integral;
* ``proposals``: seeded directions and diagonal importance-sampling proposals; ``tilted``: the prior tilted by a
  curvature model (``curvature``: Ĝ = U diag(λ) Uᵀ + λ₀ (I − UUᵀ)), the curvature proposal;
* ``numerics``: float64 log-space helpers; ``stats``: log-mean-exp, ESS, bounds; ``psis``: Pareto-k̂ of the weights;
* ``quadratic``: the exact prior mass of a quadratic behaviour (an oracle);
* ``results``: ``VolumeResult``; ``collectives``: the two multi-process contracts; ``checks``: argument validation.

Nothing is re-exported here: the public names live in :mod:`hfvolume`.
"""

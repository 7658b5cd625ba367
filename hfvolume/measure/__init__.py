"""``estimate_local_volume``: one call from a model, its data and user options to a ``VolumeResult``, in one
process or many. Resolves the options (prior, proposal, process layout) and hands a behaviour to the core."""

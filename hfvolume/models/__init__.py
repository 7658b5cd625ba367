"""Model + data → behaviour: parameter views, batches, Hugging Face output conventions, the behaviour Δ(θ) of a
``torch.nn.Module`` on fixed data, optimizer state and curvature for proposals. Imports only the core below it."""

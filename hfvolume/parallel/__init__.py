"""Process topology: torch.distributed / Accelerate glue for splitting directions across ranks, and the FSDP2
behaviour that measures a model whose parameters are sharded. Imports the core and the model layer only."""

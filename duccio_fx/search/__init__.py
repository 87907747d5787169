"""The search: the search-space protocol and its methods (mask), constraints, the DUCCIO objective, the
feasibility check and the one-shot recipe with its checkpoints and warmup cache."""

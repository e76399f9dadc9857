"""One module per measurement, each returning a result object (to_json / to_dataframe / summary):
probe, anisotropy, objectives (losses and behavioural metrics), behaviour (batched evaluation of
edits), sweep (plan, store, resume, summarize), companion (post-training SVD, geometry, lifecycle)."""

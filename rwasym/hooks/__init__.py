"""Hooks on a running model: activation statistics (`activations`), per-token gradients
(`gradients`) and rank-1 edits (`edits`). Every hook lives in a context and is removed on exit."""

"""`rwasym probe`: the relative-subspace-fraction probe; its flags are `ProbeConfig`'s fields."""

import argparse
import sys
from typing import Any

from ...errors import RwasymError
from .common import add_config_flags, config_from_args, read_tokens


def add_probe_parser(sub: Any) -> argparse.ArgumentParser:
    from ...analyses.probe import ProbeConfig

    p = sub.add_parser("probe", help="relative-subspace-fraction probe of ΔW = tuned − base")
    p.add_argument("--base", required=True, help="hub name, HF folder or rwasym checkpoint folder")
    p.add_argument("--tuned", default=None, help="tuned checkpoint (hub name or folder)")
    p.add_argument(
        "--tuned-adapter",
        default=None,
        help="PEFT LoRA adapter folder on --base: the tuned model is base + adapter (instead of --tuned)",
    )
    p.add_argument(
        "--replicate",
        default=None,
        help="--delta noise_floor: a second tuned checkpoint, the same run with another seed "
        "(rows of W_replicate − W_tuned)",
    )
    p.add_argument("--data", required=True, help="text file, or .safetensors with input_ids")
    add_config_flags(p, ProbeConfig)  # --k, --null-samples, --matrices, --no-heads, ... from its fields
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.add_argument("--out", default="probe.json")
    p.set_defaults(func=run_probe)
    return p


def run_probe(args: argparse.Namespace) -> int:
    import rwasym

    from ...analyses.probe import ProbeConfig
    from ...models import load_pair

    config = config_from_args(args, ProbeConfig)
    if config.delta == "given":
        raise RwasymError(
            "--delta given needs a Python mapping of deltas: use rwasym.probe(..., delta='given', deltas=...)"
        )
    if (config.delta == "noise_floor") != (args.replicate is not None):
        raise RwasymError(
            "--delta noise_floor and --replicate go together: pass both (W_replicate − W_tuned) or neither"
        )
    if config.stream:  # every model read from its folder, the base one block at a time
        from ...models.streaming import BlockStream

        if args.tuned_adapter:
            raise RwasymError(
                "--stream reads full checkpoint folders; merge the adapter into a folder, or drop --stream"
            )
        base = BlockStream(args.base)
        tuned = args.tuned if config.delta in ("tuned", "noise_floor") else None
        data = read_tokens(args.data, base.model)
    elif config.delta in ("base_weight", "random_delta"):  # reference rows from the base alone: no tuned model
        base, tuned = rwasym.load(args.base), None
    else:  # noise_floor differences two loaded tuned models
        stream = config.delta == "tuned"
        base, tuned = load_pair(args.base, args.tuned, args.tuned_adapter, "probe", stream=stream)
    if not config.stream:
        data = read_tokens(args.data, base)
    if not args.quiet and isinstance(data, dict):  # what the run will cost, before it starts (stderr)
        from ...analyses.cost import estimate_probe

        mask = data.get("attention_mask")
        n_tokens = int(mask.sum()) if mask is not None else int(data["input_ids"].numel())
        from ...models.streaming import BlockStream

        model = base.model if isinstance(base, BlockStream) else base
        print(estimate_probe(model, n_tokens, config, stream=config.stream).summary(), file=sys.stderr)
    result = rwasym.probe(
        base,
        tuned,
        data,
        config,
        replicate=args.replicate,
        progress=False if args.quiet else None,
    )
    result.to_json(args.out)
    print(result.summary())
    print(f"wrote {len(result.rows)} rows to {args.out}")
    return 0

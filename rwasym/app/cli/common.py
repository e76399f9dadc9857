"""What the commands share: token and pair readers, and the flags of a config dataclass (one flag per field:
its default, help and parser come from the field; `add_config_flags` / `config_from_args`)."""

import argparse
from typing import Any


def read_tokens(path: str, model):
    """Token data for a command: a .safetensors file with ``input_ids`` (and optional
    ``attention_mask``), or a plain-text file tokenised by `rwasym.data.load_text`."""
    from ...errors import RwasymError

    if path.endswith(".safetensors"):
        from ...data import load_tensors

        tensors = load_tensors(path, "--data")
        if "input_ids" not in tensors:
            raise RwasymError(f"{path!r} has no 'input_ids' tensor; found {sorted(tensors)}")
        return {k: v for k, v in tensors.items() if k in ("input_ids", "attention_mask")}
    return path  # rwasym.capture reads text files itself


def load_pairs_for(path: str, model: Any, args: argparse.Namespace):
    """Pairs for a command: .safetensors token ids, or TRL-format JSONL (token ids, strings or chat
    messages) tokenized with ``model``'s own tokenizer (`Model.load_pairs`; --chat-template, --max-length)."""
    return model.load_pairs(path, chat_template=args.chat_template, max_length=args.max_length)


def token_tensor(path: str, model):
    """Token rows (n_seqs, pos) from a .safetensors ``input_ids`` file or a text file."""
    from ...data.pairs import load_text

    data = read_tokens(path, model)
    if isinstance(data, dict):
        return data["input_ids"]
    return load_text(data, tokenizer=model.tokenizer, d_vocab=model.d_vocab)


def parse_seeds(text: str) -> list[int]:
    from ...errors import RwasymError

    try:
        return [int(s) for s in text.split(",") if s.strip()]
    except ValueError:
        raise RwasymError(f"--seeds must be comma-separated integers such as 0,1,2; got {text!r}") from None


def parse_csv(kind: type, text: Any, flag: str) -> tuple:
    """``"0.5,1,2"`` → (0.5, 1.0, 2.0); a tuple (a field default) passes through."""
    if isinstance(text, tuple):
        return text
    try:
        return tuple(kind(x.strip()) for x in str(text).split(",") if x.strip())
    except ValueError:
        from ...errors import RwasymError

        raise RwasymError(
            f"{flag} must be comma-separated {'numbers' if kind is float else kind.__name__ + ' values'} "
            f"such as {'0.5,1,2' if kind is float else 'a,b'}; got {text!r}"
        ) from None


def add_config_flags(p: argparse.ArgumentParser, config_class: type) -> None:
    """One flag per field of a config dataclass (``--edits-per-pass`` for ``edits_per_pass``): its
    default, its help (the field's comment) and its parser come from the field itself."""
    import dataclasses

    for f in dataclasses.fields(config_class):
        meta, flag = f.metadata, "--" + f.name.replace("_", "-")
        help = meta.get("help", "").replace("%", "%%")  # argparse expands %-formats in help
        if isinstance(f.default, bool):
            if f.default:
                p.add_argument(
                    "--no-" + f.name.replace("_", "-"), dest=f.name, action="store_false", help="do not " + help
                )
            else:
                p.add_argument(flag, dest=f.name, action="store_true", help=help)
            continue
        default: Any = f.default  # every config field has a plain default
        if "list_of" in meta:  # parsed by config_from_args, so a bad value raises RwasymError
            p.add_argument(
                flag,
                dest=f.name,
                default=f.default,
                help=f"{help}; comma separated (default {','.join(map(str, default)) or 'none'})",
            )
            continue
        kind = meta.get("type", type(f.default))
        p.add_argument(
            flag,
            dest=f.name,
            type=kind,
            default=f.default,
            choices=meta.get("choices"),
            help=f"{help} (default {f.default})",
        )


def config_from_args(args: argparse.Namespace, config_class: type) -> Any:
    """The config dataclass of `add_config_flags`' flags (comma-separated lists parsed here)."""
    import dataclasses

    values = {}
    for f in dataclasses.fields(config_class):
        value = getattr(args, f.name)
        kind = f.metadata.get("list_of")
        values[f.name] = value if kind is None else parse_csv(kind, value, "--" + f.name.replace("_", "-"))
    return config_class(**values)


def chat_template_flag(p: argparse.ArgumentParser) -> None:
    """The flags of commands that read text pairs: --chat-template and --max-length."""
    p.add_argument(
        "--chat-template",
        action="store_true",
        help="render string prompts of text pairs through the tokenizer's chat template (instruct models)",
    )
    p.add_argument(
        "--max-length",
        type=int,
        default=None,
        help="truncate prompt + completion of JSONL pairs to this many tokens, keeping the start "
        "(TRL's DPO truncation); default: none (pairs longer than the context are refused)",
    )

"""Config dataclasses filled from defaults < YAML file (`--config`) < command-line flags.

Every subcommand has one dataclass; its defaults live there and only there. The YAML file's keys
are the dataclass field names; unknown keys and values of the wrong type are errors that name the
file and the key. YAML values are turned into command-line tokens placed *before* the real flags,
so argparse does all the typing and the last occurrence (the real flag) wins.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
from pathlib import Path
from typing import Any, TypeVar

import yaml

from mnpo.errors import MnpoError
from mnpo.io import atomic_write

T = TypeVar("T")


class ConfigError(MnpoError):
    pass


def _make_parser(config_cls: type, prog: str | None):
    # Imported here: hf_argparser is light (no torch), and it already knows how to turn
    # TrainingArguments' Optional/Union/Enum/Literal fields into argparse arguments.
    from transformers.hf_argparser import HfArgumentParser

    class _Parser(HfArgumentParser):
        def error(self, message):  # argparse would print usage and sys.exit(2)
            raise ConfigError(message)

    parser = _Parser(config_cls, prog=prog, formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument(
        "--config",
        default=None,
        help="YAML file of field: value defaults for this command; command-line flags override it",
    )
    _add_aliases(parser)
    return parser


# One flag vocabulary across commands: each field also answers to the names TRL and transformers use for
# it (or that another mnpo command uses), so a flag or YAML key from one command or a TRL script works in
# the others. Field name -> other names; an alias is added only where it is not a field of its own.
FLAG_ALIASES: dict[str, tuple[str, ...]] = {
    "dataset": ("dataset_name",),  # TRL's ScriptArguments.dataset_name
    "dataset_name": ("dataset",),  # train-egpo's field; the other commands say --dataset
    "dataset_split": ("dataset_train_split",),  # TRL's ScriptArguments.dataset_train_split
    "split": ("dataset_split", "dataset_train_split"),  # decode, annotate, precompute
    "eval_split": ("dataset_test_split",),  # TRL's ScriptArguments.dataset_test_split
    "model_dtype": ("dtype", "torch_dtype"),  # TRL's ModelConfig.dtype (torch_dtype before transformers 4.56)
    "dtype": ("torch_dtype",),
    "ref_model": ("ref_model_name_or_path",),  # train-egpo's and TRL's name of the reference policy
}


def _add_aliases(parser: argparse.ArgumentParser) -> None:
    """Register FLAG_ALIASES as extra option strings of the field's own action: argparse then fills the
    same field from either name, `--help` lists both, and the last occurrence wins as for one flag."""
    taken = set(parser._option_string_actions)
    for action in list(parser._actions):
        if not action.option_strings or action.dest not in FLAG_ALIASES:
            continue
        negated = action.option_strings[0] == f"--no_{action.dest}"  # a True-default bool's store_false twin
        for alias in FLAG_ALIASES[action.dest]:
            option = f"--no_{alias}" if negated else f"--{alias}"
            if option in taken:
                continue  # a field of that name exists: it keeps its own meaning
            action.option_strings.append(option)
            parser._option_string_actions[option] = action
            taken.add(option)


def field_of(name: str, actions: dict[str, argparse.Action]) -> str | None:
    """The field a flag or YAML key names (itself or through an alias), or None for an unknown name."""
    if name in actions:
        return name
    option = f"--{name}"
    return next((dest for dest, a in actions.items() if option in a.option_strings), None)


def _field_actions(parser: argparse.ArgumentParser) -> dict[str, argparse.Action]:
    # First action per field: a bool field defaulting to True also gets a `--no_<field>` store_false
    # action with the same dest, added after the real one; YAML values must go to the real one.
    actions: dict[str, argparse.Action] = {}
    for a in parser._actions:
        if a.option_strings and a.dest not in ("help", "config"):
            actions.setdefault(a.dest, a)
    return actions


def load_yaml(path: str | os.PathLike) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file {path} does not exist")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        raise ConfigError(f"config file {path} is not valid YAML: {exc}") from exc
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"config file {path} must be a mapping of field: value, got {type(data).__name__}")
    return data


def _scalar_token(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, dict):
        return json.dumps(value)
    return str(value)


def _yaml_to_argv(path: str, data: dict[str, Any], actions: dict[str, argparse.Action]):
    """YAML mapping -> (argv tokens, values argparse cannot express (None, []))."""
    argv: list[str] = []
    direct: dict[str, Any] = {}
    seen: dict[str, str] = {}
    for key, value in data.items():
        dest = field_of(key, actions)
        if dest is None:
            raise ConfigError(f"config file {path}: unknown key '{key}'. Valid keys: {', '.join(sorted(actions))}")
        if dest in seen:
            raise ConfigError(
                f"config file {path}: keys '{seen[dest]}' and '{key}' set the same field '{dest}'; keep one"
            )
        seen[dest] = key
        action = actions[dest]
        if value is None or value == []:
            direct[dest] = value
            continue
        takes_list = action.nargs in ("+", "*")
        if isinstance(value, list) and not takes_list:
            raise ConfigError(f"config file {path}: key '{key}' takes a single value, got the list {value!r}")
        values = value if isinstance(value, list) else [value]
        tokens = [_scalar_token(v) for v in values]
        for token in tokens:  # type-check here so the error names the file and key
            try:
                converted = action.type(token) if action.type else token
            except (TypeError, ValueError, argparse.ArgumentTypeError) as exc:
                raise ConfigError(
                    f"config file {path}: key '{key}' has value {token!r} of the wrong type ({exc})"
                ) from exc
            if action.choices is not None and converted not in action.choices:
                raise ConfigError(
                    f"config file {path}: key '{key}' is {token!r}, expected one of {list(action.choices)}"
                )
        argv += [action.option_strings[0], *tokens]
    return argv, direct


def _merge_repeated_list_flags(argv: list[str], actions: dict[str, argparse.Action]) -> list[str]:
    """`--reward_model a --reward_model b` -> `--reward_model a b` for list fields (argparse keeps
    only the last occurrence). Done on the command-line part alone, so it still overrides the YAML."""
    list_flags = {s: a.dest for a in actions.values() if a.nargs in ("+", "*") for s in a.option_strings}
    merged: dict[str, list[str]] = {}
    out: list[str] = []
    i = 0
    while i < len(argv):
        token = argv[i]
        flag, eq, inline = token.partition("=")
        if flag in list_flags:
            dest = list_flags[flag]
            values = [inline] if eq else []
            i += 1
            while not eq and i < len(argv) and not argv[i].startswith("--"):
                values.append(argv[i])
                i += 1
            if dest not in merged:
                merged[dest] = []
                out.append(("LIST", dest))
            merged[dest] += values
            continue
        out.append(token)
        i += 1
    result: list[str] = []
    for item in out:
        if isinstance(item, tuple):
            result += [actions[item[1]].option_strings[0], *merged[item[1]]]
        else:
            result.append(item)
    return result


def parse_config(config_cls: type[T], argv: list[str] | None = None, prog: str | None = None) -> T:
    """Build `config_cls` from its defaults, an optional `--config` YAML file and CLI flags."""
    parser = _make_parser(config_cls, prog)
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--config", default=None)
    known, _ = pre.parse_known_args(argv)
    yaml_argv: list[str] = []
    direct: dict[str, Any] = {}
    actions = _field_actions(parser)
    if known.config:
        yaml_argv, direct = _yaml_to_argv(known.config, load_yaml(known.config), actions)
    cli_argv = _merge_repeated_list_flags(list(argv or []), actions)
    try:
        # The extra `--config` argument comes back as a trailing Namespace; the dataclass is first.
        config = parser.parse_args_into_dataclasses(args=yaml_argv + cli_argv)[0]
    except ConfigError:
        raise
    except ValueError as exc:  # __post_init__ cross-field checks
        # Say where the settings came from: the value at fault may be in the YAML file, not on the command line.
        where = f" (settings from {known.config} and the command line)" if known.config else ""
        raise ConfigError(f"{exc}{where}") from exc
    cli_flags = {tok.split("=", 1)[0] for tok in cli_argv if tok.startswith("--")}
    for key, value in direct.items():
        if not set(actions[key].option_strings) & cli_flags:
            setattr(config, key, value)
    return config


def config_to_dict(config: Any) -> dict[str, Any]:
    """Plain, YAML-serialisable dict of a config (TrainingArguments subclasses included)."""
    raw = config.to_dict() if hasattr(config, "to_dict") else dataclasses.asdict(config)

    def clean(v):
        if isinstance(v, dict):
            return {str(k): clean(x) for k, x in v.items()}
        if isinstance(v, (list, tuple)):
            return [clean(x) for x in v]
        if v is None or isinstance(v, (bool, int, float, str)):
            return v
        return getattr(v, "value", str(v))  # enums -> their value

    return {k: clean(v) for k, v in raw.items() if not k.startswith("_")}


def config_file_name(command: str) -> str:
    """The one name of a command's resolved config in its output folder: `<command>_config.yaml` with
    dashes as underscores (train-mnpo -> train_mnpo_config.yaml), as decode, annotate, precompute, split,
    toy, train-egpo and pipeline always wrote it."""
    return f"{command.replace('-', '_')}_config.yaml"


def save_config(config: Any, output_dir: str | os.PathLike, filename: str | None = None) -> Path:
    """Write the resolved config next to a stage's output (atomically), as `filename`, by default
    `config_file_name(config.CLI_COMMAND)` (config.yaml for a config class that names no command)."""
    command = getattr(config, "CLI_COMMAND", None)
    path = Path(output_dir) / (filename or (config_file_name(command) if command else "config.yaml"))
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_write(path) as f:
        yaml.safe_dump(config_to_dict(config), f, sort_keys=False)
    return path


# ----- validation shared by the config dataclasses (called from their __post_init__) ---------------
def check_at_least(config: Any, minimum: int, *names: str, unset: str = "") -> None:
    """Each named field must be >= minimum when set; `unset` says what leaving it unset means."""
    for name in names:
        value = getattr(config, name)
        if value is not None and value < minimum:
            hint = f" ({unset})" if unset else ""
            raise ValueError(f"--{name} must be >= {minimum}{hint}, got {value}")


def check_training_length(args: Any) -> None:
    """A training run must take at least one step: 0 steps would save the untrained model as the result.

    transformers' convention: max_steps -1 = unset (train for num_train_epochs); any other value wins.
    """
    if args.max_steps == 0 or args.max_steps < -1:
        raise ValueError(
            f"--max_steps must be >= 1, or -1 to train for --num_train_epochs, got {args.max_steps} "
            "(0 steps would save the untrained model as the result)"
        )
    if args.max_steps == -1 and not args.num_train_epochs > 0:
        raise ValueError(
            f"--num_train_epochs must be > 0, got {args.num_train_epochs} (0 epochs would save the untrained "
            "model as the result); set --num_train_epochs (e.g. 1) or --max_steps"
        )
    # 0 would fail only when the first batch is drawn, after the models are loaded, with torch's own message.
    for name in ("per_device_train_batch_size", "per_device_eval_batch_size", "gradient_accumulation_steps"):
        if getattr(args, name) < 1:
            raise ValueError(f"--{name} must be >= 1, got {getattr(args, name)}")


_NOT_A_POLICY = ("ForSequenceClassification", "ForTokenClassification", "ForQuestionAnswering")


def check_causal_lm(path: str | None, option: str) -> None:
    """Refuse a local reward / preference model (a sequence classifier) where a policy is expected.

    AutoModelForCausalLM loads such a checkpoint without complaint (its backbone, and the LM head
    tied to the embeddings), so its log-probs and samples would be silently meaningless.
    """
    if not path:
        return
    config_file = Path(path) / "config.json"
    if not config_file.is_file():
        return  # a Hub id or an adapter folder: checked when loaded, if at all
    try:
        architectures = json.loads(config_file.read_text()).get("architectures") or []
    except (OSError, ValueError):
        return  # not ours to judge here; from_pretrained reports a broken config
    if architectures and all(a.endswith(_NOT_A_POLICY) for a in architectures):
        raise ValueError(
            f"--{option} {path} is a {architectures[0]} (a reward or preference model), not a causal language "
            "model; pass a policy checkpoint (e.g. the SFT model)"
        )


def context_length(model_config: Any, tokenizer: Any = None) -> int | None:
    """The model's context in tokens: the smaller of max_position_embeddings and the tokenizer's
    model_max_length, ignoring values that are not real limits (tokenizers without one report ~1e30)."""
    text_config = model_config.get_text_config() if hasattr(model_config, "get_text_config") else model_config
    limits = [getattr(text_config, "max_position_embeddings", None), getattr(tokenizer, "model_max_length", None)]
    limits = [x for x in limits if isinstance(x, int) and not isinstance(x, bool) and 0 < x < 1_000_000]
    return min(limits) if limits else None


def resolve_max_length(
    requested: int | None, context: int | None, option: str, model: str, fallback: int = 1024
) -> int:
    """`requested`, or the model's context when unset (`fallback` for a model that states none); more
    than the context is an error naming the option."""
    if requested is None:
        return fallback if context is None else context
    if context is not None and requested > context:
        raise ConfigError(
            f"--{option} {requested} exceeds the context of {model} ({context} tokens); pass --{option} {context} "
            "or less (or leave it unset for the model's context)"
        )
    return requested


def model_context(name_or_path: str, tokenizer: Any = None) -> int | None:
    """`context_length` of a model folder or Hub id from its config alone (no weights are loaded)."""
    from transformers import AutoConfig

    try:
        config = AutoConfig.from_pretrained(name_or_path)
    except (OSError, ValueError):  # e.g. a LoRA adapter folder: only the tokenizer's limit is known
        return context_length(object(), tokenizer)
    return context_length(config, tokenizer)


def prompt_budget(max_prompt_length: int | None, max_new_tokens: int, context: int | None, model: str) -> int:
    """Prompt tokens to keep so that prompt + max_new_tokens fits the context: --max_prompt_length, or by
    default all that the context leaves (512 for a model that states no context)."""
    if context is None:
        return 512 if max_prompt_length is None else max_prompt_length
    room = context - max_new_tokens
    if room < 1:
        raise ConfigError(
            f"--max_new_tokens {max_new_tokens} leaves no room for a prompt in the context of {model} "
            f"({context} tokens); lower --max_new_tokens"
        )
    if max_prompt_length is None:
        return room
    if max_prompt_length > room:
        raise ConfigError(
            f"--max_prompt_length {max_prompt_length} + --max_new_tokens {max_new_tokens} exceed the context of "
            f"{model} ({context} tokens); lower one of them (or leave --max_prompt_length unset)"
        )
    return max_prompt_length


PAIR_LENGTHS = (2048, 1800)  # the paper recipe's max_length and max_prompt_length


def resolve_pair_lengths(config: Any, context: int | None, model: str) -> None:
    """Fill in max_length / max_prompt_length of precompute and train-mnpo (in place, so the saved config
    holds the values used): 2048 and 1800, scaled down to the model's context when it is smaller."""
    max_length = config.max_length
    if max_length is None:
        max_length = PAIR_LENGTHS[0] if context is None else min(PAIR_LENGTHS[0], context)
    elif context is not None and max_length > context:
        raise ConfigError(
            f"--max_length {max_length} exceeds the context of {model} ({context} tokens); pass --max_length "
            f"{context} or less (or leave it unset)"
        )
    max_prompt_length = config.max_prompt_length
    if max_prompt_length is None:
        max_prompt_length = max_length * PAIR_LENGTHS[1] // PAIR_LENGTHS[0]
    if max_prompt_length >= max_length:
        raise ConfigError(f"--max_prompt_length ({max_prompt_length}) must be smaller than --max_length ({max_length})")
    config.max_length, config.max_prompt_length = max_length, max_prompt_length

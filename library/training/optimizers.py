"""Optimizer flags and the optimizer factory, with sd-scripts' names and `--optimizer_args` syntax.

`--optimizer_type` takes a known name in any case (AdamW, AdamW8bit, PagedAdamW, PagedAdamW8bit,
PagedAdamW32bit, Lion, Lion8bit, PagedLion8bit, SGDNesterov, SGDNesterov8bit, Prodigy, Adafactor,
AdamWScheduleFree, RAdamScheduleFree, SGDScheduleFree), a `torch.optim` class name, or any class by
dotted path ("bitsandbytes.optim.AdEMAMix8bit"). The optimizers themselves come from torch,
bitsandbytes (8-bit, paged, and Lion), prodigyopt, schedulefree and transformers (Adafactor); this
module resolves the name, parses `key=value` arguments, checks them against the class's signature,
and applies sd-scripts' conventions (Nesterov SGD defaults to momentum 0.9; Adafactor defaults to
relative_step=True, in which case it computes its own learning rate and needs the `adafactor`
LR scheduler; schedule-free optimizers start in train mode and need `set_optimizer_train_mode`).
"""

from __future__ import annotations

import argparse
import ast
import importlib
import inspect
import logging
import re
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from library.errors import UserError, did_you_mean

if TYPE_CHECKING:
    import torch

logger = logging.getLogger(__name__)


def add_optimizer_arguments(parser: argparse.ArgumentParser, default_learning_rate: float = 2e-6) -> None:
    group = parser.add_argument_group("optimizer")
    group.add_argument("--optimizer_type", default=None,
                       help="AdamW (default), AdamW8bit, PagedAdamW8bit, Lion, Lion8bit, PagedLion8bit, SGDNesterov, "
                            "SGDNesterov8bit, Prodigy, Adafactor, AdamWScheduleFree, RAdamScheduleFree, ... or a "
                            "class by dotted path such as torch.optim.SGD")
    group.add_argument("--use_8bit_adam", action="store_true", help="same as --optimizer_type AdamW8bit (sd-scripts' old switch)")
    group.add_argument("--use_lion_optimizer", action="store_true", help="same as --optimizer_type Lion (sd-scripts' old switch)")
    group.add_argument("--optimizer_args", nargs="*", default=None,
                       help='extra optimizer arguments as key=value, e.g. "weight_decay=0.01" "betas=0.9,0.999"')
    group.add_argument("--learning_rate", type=float, default=default_learning_rate,
                       help=f"learning rate (default {default_learning_rate:g})")
    group.add_argument("--max_grad_norm", type=float, default=1.0,
                       help="clip gradients to this total norm; 0 disables clipping (default 1.0)")


_OLD_SWITCHES = {"use_8bit_adam": "AdamW8bit", "use_lion_optimizer": "Lion"}


def apply_optimizer_switches(args: argparse.Namespace) -> None:
    """sd-scripts' --use_8bit_adam / --use_lion_optimizer become --optimizer_type, as there; one at a time."""
    given = [flag for flag in _OLD_SWITCHES if getattr(args, flag, False)]
    if len(given) > 1:
        raise UserError("--use_8bit_adam and --use_lion_optimizer exclude each other; give one --optimizer_type")
    if not given:
        return
    if args.optimizer_type:
        raise UserError(f"--{given[0]} and --optimizer_type {args.optimizer_type} exclude each other; keep one")
    args.optimizer_type = _OLD_SWITCHES[given[0]]


@dataclass(frozen=True)
class _Known:
    """A named optimizer: where its class lives and the arguments sd-scripts sets for it."""

    name: str
    module: str
    class_name: str
    fixed_kwargs: dict = field(default_factory=dict)  # always passed; the user may not override them
    default_kwargs: dict = field(default_factory=dict)  # passed unless the user gives their own

    def load(self) -> type:
        return _import_class(self.module, self.class_name, self.name)


_NESTEROV = {"fixed_kwargs": {"nesterov": True}, "default_kwargs": {"momentum": 0.9}}
_KNOWN = {
    known.name.lower(): known
    for known in (
        _Known("AdamW", "torch.optim", "AdamW"),
        _Known("AdamW8bit", "bitsandbytes.optim", "AdamW8bit"),
        _Known("PagedAdamW", "bitsandbytes.optim", "PagedAdamW"),
        _Known("PagedAdamW8bit", "bitsandbytes.optim", "PagedAdamW8bit"),
        _Known("PagedAdamW32bit", "bitsandbytes.optim", "PagedAdamW32bit"),
        _Known("Lion", "bitsandbytes.optim", "Lion"),  # 32-bit; same update and defaults as lion-pytorch
        _Known("Lion8bit", "bitsandbytes.optim", "Lion8bit"),
        _Known("PagedLion8bit", "bitsandbytes.optim", "PagedLion8bit"),
        _Known("SGDNesterov", "torch.optim", "SGD", **_NESTEROV),
        _Known("SGDNesterov8bit", "bitsandbytes.optim", "SGD8bit", **_NESTEROV),
        _Known("Prodigy", "prodigyopt", "Prodigy"),
        _Known("Adafactor", "transformers.optimization", "Adafactor", default_kwargs={"relative_step": True}),
        _Known("AdamWScheduleFree", "schedulefree", "AdamWScheduleFree"),
        _Known("RAdamScheduleFree", "schedulefree", "RAdamScheduleFree"),
        _Known("SGDScheduleFree", "schedulefree", "SGDScheduleFree"),
    )
}


def known_optimizer_names() -> list[str]:
    return [known.name for known in _KNOWN.values()]


def _import_class(module_name: str, class_name: str, shown_as: str) -> type:
    try:
        module = importlib.import_module(module_name)
    except ImportError as e:
        raise UserError(f"--optimizer_type {shown_as}: cannot import `{module_name}` ({e}); "
                        "install it or choose another optimizer") from e
    cls = getattr(module, class_name, None)
    if not isinstance(cls, type):
        raise UserError(f"--optimizer_type {shown_as}: `{module_name}` has no class `{class_name}`")
    return cls


def _torch_optim_classes() -> dict[str, type]:
    import torch

    return {name: obj for name, obj in vars(torch.optim).items()
            if isinstance(obj, type) and issubclass(obj, torch.optim.Optimizer) and obj is not torch.optim.Optimizer}


def resolve_optimizer(optimizer_type: str | None) -> tuple[type, _Known | None]:
    """The optimizer class for --optimizer_type, and its sd-scripts conventions if it is a known name."""
    name = (optimizer_type or "AdamW").strip()
    known = _KNOWN.get(name.lower())
    if known:
        return known.load(), known
    if "." in name:
        module_name, _, class_name = name.rpartition(".")
        return _import_class(module_name, class_name, name), None
    torch_classes = {cls_name.lower(): cls for cls_name, cls in _torch_optim_classes().items()}
    if name.lower() in torch_classes:
        return torch_classes[name.lower()], None
    if name.lower().startswith("dadapt"):
        raise UserError(f"--optimizer_type {name}: D-Adaptation optimizers are not supported; "
                        "use Prodigy (its successor, --optimizer_type Prodigy --learning_rate 1.0)")
    raise UserError(f"unknown --optimizer_type {name}{did_you_mean(name, known_optimizer_names())}; "
                    f"known: {', '.join(known_optimizer_names())}, a torch.optim class, or a dotted class path")


# ----- --optimizer_args ---------------------------------------------------------------------------
def parse_key_values(items: list[str] | None, flag: str) -> dict[str, Any]:
    """`key=value` strings -> dict; values are Python literals ("0.9,0.999" is a tuple), else strings."""
    parsed: dict[str, Any] = {}
    for item in items or []:
        key, sep, text = str(item).partition("=")
        key = key.strip()
        if not sep or not key.isidentifier():
            raise UserError(f"{flag}: {item!r} is not key=value (e.g. weight_decay=0.01)")
        if re.search(r"\s\w+=", text):
            raise UserError(f"{flag}: {item!r} holds several key=value pairs; pass each as its own "
                            "argument (separated by spaces, not inside one quoted string)")
        parsed[key] = _literal(text.strip())
    return parsed


def _literal(text: str) -> Any:
    if text.lower() in ("true", "false"):
        return text.lower() == "true"
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return text


def resolved_optimizer_kwargs(args: argparse.Namespace) -> dict[str, Any]:
    """The keyword arguments the optimizer gets besides params and lr (defaults + --optimizer_args)."""
    _, known = resolve_optimizer(args.optimizer_type)
    user = parse_key_values(args.optimizer_args, "--optimizer_args")
    shown = known.name if known else args.optimizer_type
    for reserved in ("lr", "params"):
        if reserved in user:
            raise UserError(f"--optimizer_args {reserved}=...: set the learning rate with --learning_rate "
                            "(and --unet_lr / --text_encoder_lr), not in --optimizer_args")
    if known:
        for key in known.fixed_kwargs:
            if key in user:
                raise UserError(f"--optimizer_args {key}=...: {shown} always uses {key}={known.fixed_kwargs[key]}")
        return {**known.default_kwargs, **user, **known.fixed_kwargs}
    return user


def _check_kwargs_accepted(cls: type, kwargs: dict, shown: str) -> None:
    parameters = inspect.signature(cls.__init__).parameters
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters.values()):
        return
    accepted = [name for name in parameters if name not in ("self", "params", "lr")]
    for key in kwargs:
        if key not in parameters:
            raise UserError(f"--optimizer_args: {shown} has no argument `{key}`{did_you_mean(key, accepted)}; "
                            f"it accepts {', '.join(accepted)}")


# ----- building -----------------------------------------------------------------------------------
def build_optimizer(args: argparse.Namespace, param_groups) -> "torch.optim.Optimizer":
    """The optimizer for --optimizer_type/--optimizer_args/--learning_rate over `param_groups`
    (a list of parameters or of dicts with "params" and optionally "lr")."""
    cls, known = resolve_optimizer(args.optimizer_type)
    shown = known.name if known else args.optimizer_type
    kwargs = resolved_optimizer_kwargs(args)
    _check_kwargs_accepted(cls, kwargs, shown)
    lr: float | None = args.learning_rate
    if known and known.name == "Adafactor":
        param_groups, lr = _prepare_adafactor(kwargs, param_groups, lr)
    elif known and known.name == "Prodigy" and lr is not None and lr <= 0.1:
        logger.warning("Prodigy adapts the step size itself; --learning_rate is a multiplier and around 1.0 "
                       "is recommended (got %g)", lr)
    optimizer = _construct(cls, param_groups, lr, kwargs, shown)
    logger.info("optimizer: %s", describe_optimizer(args, optimizer))
    set_optimizer_train_mode(optimizer, True)  # schedule-free optimizers refuse to step in eval mode
    return optimizer


def _construct(cls: type, param_groups, lr, kwargs: dict, shown: str):
    try:
        return cls(param_groups, lr=lr, **kwargs)
    except (ValueError, TypeError) as e:
        raise UserError(f"--optimizer_type {shown} rejected its arguments {kwargs or ''}: {e}") from e


def _prepare_adafactor(kwargs: dict, param_groups, lr):
    """sd-scripts' Adafactor rules: relative_step (the default) ignores lr and per-group lrs."""
    if kwargs.get("warmup_init") and not kwargs.get("relative_step"):
        logger.info("Adafactor: warmup_init=True needs relative_step=True; setting it")
        kwargs["relative_step"] = True
    if not kwargs["relative_step"]:
        return param_groups, lr
    groups = list(param_groups)
    if groups and isinstance(groups[0], dict):
        group_lrs = {group.get("lr", lr) for group in groups}
        if len(group_lrs) > 1:
            raise UserError("Adafactor with relative_step=True computes its own learning rate and cannot use "
                            "separate --unet_lr/--text_encoder_lr; pass --optimizer_args relative_step=False")
        groups = [{k: v for k, v in group.items() if k != "lr"} for group in groups]
    logger.info("Adafactor: relative_step=True, the optimizer sets its own learning rate "
                "(--learning_rate %s is only reported as the initial value)", lr)
    return groups, None


def describe_optimizer(args: argparse.Namespace, optimizer) -> str:
    """'module.Class(k=v,...)' as sd-scripts writes it into ss_optimizer."""
    inner = _unwrap(optimizer)
    name = f"{type(inner).__module__}.{type(inner).__name__}"
    kwargs = resolved_optimizer_kwargs(args)
    return name + (f"({','.join(f'{k}={v}' for k, v in kwargs.items())})" if kwargs else "")


# ----- train/eval mode ----------------------------------------------------------------------------
def _unwrap(optimizer):
    """The optimizer inside accelerate's AcceleratedOptimizer wrapper, if any."""
    return optimizer.optimizer if type(optimizer).__name__ == "AcceleratedOptimizer" else optimizer


def is_schedule_free(optimizer) -> bool:
    """Schedule-free optimizers (schedulefree package) expose train()/eval() and ignore LR schedules."""
    inner = _unwrap(optimizer)
    return callable(getattr(inner, "train", None)) and callable(getattr(inner, "eval", None))


def set_optimizer_train_mode(optimizer, training: bool) -> None:
    """Switch a schedule-free optimizer's weights between train and eval; no-op for others.
    Call with False before sampling, validation or saving, and with True before the next step."""
    if is_schedule_free(optimizer):
        getattr(_unwrap(optimizer), "train" if training else "eval")()

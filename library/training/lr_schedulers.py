"""Learning-rate schedule flags and the scheduler factory, with sd-scripts' names and rules.

Named schedules (constant, constant_with_warmup, linear, cosine, cosine_with_restarts, polynomial)
come from `diffusers.optimization.get_scheduler`; sd-scripts' transformers ones from
transformers.optimization: warmup_stable_decay (`--lr_decay_steps` steps or ratio of decay at the end,
down to `--lr_scheduler_min_lr_ratio`), cosine_with_min_lr (cosine down to that ratio) and
inverse_sqrt (`--lr_scheduler_timescale`, default the warmup steps); `adafactor` is transformers' AdafactorSchedule,
which only reports the learning rate Adafactor computes itself; `--lr_scheduler_type` takes any
scheduler class (a `torch.optim.lr_scheduler` name or a dotted path) built with `--lr_scheduler_args`.
`--lr_warmup_steps` is a step count, or a ratio of the training steps when below 1 ("0.05" or "5%").
Options a schedule would not use are rejected instead of ignored, and schedule-free optimizers
(which replace the schedule) accept only the constant one.
"""

from __future__ import annotations

import argparse
import importlib
import logging

from library.errors import UserError, did_you_mean
from library.training.optimizers import is_schedule_free, parse_key_values

logger = logging.getLogger(__name__)

TRANSFORMERS_SCHEDULERS = ("warmup_stable_decay", "cosine_with_min_lr", "inverse_sqrt")
NAMED_SCHEDULERS = ("constant", "constant_with_warmup", "linear", "cosine", "cosine_with_restarts",
                    "polynomial", *TRANSFORMERS_SCHEDULERS, "adafactor")


def steps_or_ratio(text: str) -> int | float:
    """argparse type of --lr_warmup_steps: "100" -> 100 steps, "0.1" or "10%" -> ratio 0.1."""
    value = str(text).strip()
    try:
        number = float(value[:-1]) / 100 if value.endswith("%") else float(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a step count or a ratio below 1") from None
    if value.endswith("%") and number >= 1:
        raise argparse.ArgumentTypeError(f"{text!r}: a warmup percentage must be below 100%")
    if number < 0 or (number >= 1 and not number.is_integer()):
        raise argparse.ArgumentTypeError(f"{text!r}: give a whole number of steps or a ratio between 0 and 1")
    return int(number) if number >= 1 or number == 0 else number


def add_lr_scheduler_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("learning-rate schedule")
    group.add_argument("--lr_scheduler", default="constant",
                       help=f"{', '.join(NAMED_SCHEDULERS)} (default constant)")
    group.add_argument("--lr_warmup_steps", type=steps_or_ratio, default=0,
                       help="warmup steps, or a ratio of the training steps when below 1 (0.05 or 5%%)")
    group.add_argument("--lr_scheduler_num_cycles", type=int, default=1,
                       help="number of hard restarts of cosine_with_restarts")
    group.add_argument("--lr_scheduler_power", type=float, default=1.0, help="power of the polynomial schedule")
    group.add_argument("--lr_decay_steps", type=steps_or_ratio, default=0,
                       help="warmup_stable_decay: decay steps at the end, or a ratio of the training steps when below 1")
    group.add_argument("--lr_scheduler_min_lr_ratio", type=float, default=None,
                       help="warmup_stable_decay / cosine_with_min_lr: the lowest learning rate as a ratio of the initial one")
    group.add_argument("--lr_scheduler_timescale", type=int, default=None,
                       help="inverse_sqrt: timescale in steps (default: --lr_warmup_steps)")
    group.add_argument("--lr_scheduler_type", default="",
                       help="any scheduler class instead: a torch.optim.lr_scheduler name or a dotted path")
    group.add_argument("--lr_scheduler_args", nargs="*", default=None,
                       help='key=value arguments of --lr_scheduler_type, e.g. "T_max=100"')


def resolve_warmup_steps(value, num_training_steps: int, flag: str = "--lr_warmup_steps") -> int:
    """Warmup (or decay) as a step count: ints are steps, floats below 1 a ratio of the training steps."""
    if isinstance(value, str):
        try:
            value = steps_or_ratio(value)
        except argparse.ArgumentTypeError as e:
            raise UserError(f"{flag}: {e}") from None
    if isinstance(value, float) and not value.is_integer():
        if not 0 < value < 1:
            raise UserError(f"{flag} {value}: give a whole number of steps or a ratio between 0 and 1")
        return int(value * num_training_steps)
    steps = int(value or 0)
    if steps < 0:
        raise UserError(f"{flag} must not be negative (got {steps})")
    return steps


def build_lr_scheduler(args: argparse.Namespace, optimizer, num_training_steps: int):
    """The LR scheduler for the flags; `num_training_steps` is how many times scheduler.step() will run."""
    warmup = resolve_warmup_steps(getattr(args, "lr_warmup_steps", 0), num_training_steps)
    name = (args.lr_scheduler or "constant").split(":")[0].strip().lower()
    if getattr(args, "lr_scheduler_args", None) and not getattr(args, "lr_scheduler_type", ""):
        raise UserError("--lr_scheduler_args is for --lr_scheduler_type; the named schedules take "
                        "--lr_warmup_steps, --lr_scheduler_num_cycles and --lr_scheduler_power")
    if is_schedule_free(optimizer):
        _check_schedule_free(args, name, warmup)
    if _is_relative_step_adafactor(optimizer):
        return _adafactor_schedule(args, optimizer, name, warmup)
    if getattr(args, "lr_scheduler_type", ""):
        return _custom_scheduler(args, optimizer, name, warmup)
    if name == "adafactor":
        raise UserError("--lr_scheduler adafactor works only with --optimizer_type Adafactor")
    if name not in NAMED_SCHEDULERS:
        raise UserError(f"unknown --lr_scheduler {args.lr_scheduler}{did_you_mean(name, NAMED_SCHEDULERS)}; "
                        f"choose one of {', '.join(NAMED_SCHEDULERS)} or use --lr_scheduler_type")
    _check_named_options(args, name, warmup, num_training_steps)
    return _named_scheduler(args, optimizer, name, warmup, num_training_steps)


def _check_schedule_free(args, name: str, warmup: int) -> None:
    if getattr(args, "lr_scheduler_type", "") or name != "constant" or warmup:
        raise UserError("schedule-free optimizers replace the learning-rate schedule: use --lr_scheduler constant "
                        "without --lr_warmup_steps/--lr_scheduler_type (AdamWScheduleFree takes its own warmup "
                        "as --optimizer_args warmup_steps=N)")


def _check_named_options(args, name: str, warmup: int, num_training_steps: int) -> None:
    if name == "constant" and warmup:
        raise UserError("--lr_scheduler constant has no warmup; use constant_with_warmup with --lr_warmup_steps")
    if warmup > num_training_steps:
        raise UserError(f"--lr_warmup_steps gives {warmup} warmup steps, more than the {num_training_steps} "
                        "training steps")
    cycles, power = getattr(args, "lr_scheduler_num_cycles", 1), getattr(args, "lr_scheduler_power", 1.0)
    if cycles != 1 and name != "cosine_with_restarts":
        raise UserError(f"--lr_scheduler_num_cycles is used only by cosine_with_restarts (got --lr_scheduler {name})")
    if cycles < 1:
        raise UserError(f"--lr_scheduler_num_cycles must be at least 1 (got {cycles})")
    if power != 1.0 and name != "polynomial":
        raise UserError(f"--lr_scheduler_power is used only by polynomial (got --lr_scheduler {name})")
    users = {"lr_decay_steps": ("warmup_stable_decay",), "lr_scheduler_timescale": ("inverse_sqrt",),
             "lr_scheduler_min_lr_ratio": ("warmup_stable_decay", "cosine_with_min_lr")}
    for flag, schedules in users.items():
        if getattr(args, flag, None) and name not in schedules:
            raise UserError(f"--{flag} is used only by {' / '.join(schedules)} (got --lr_scheduler {name})")


def _named_scheduler(args, optimizer, name: str, warmup: int, num_training_steps: int):
    from diffusers.optimization import get_scheduler

    if name in TRANSFORMERS_SCHEDULERS:
        return _transformers_scheduler(args, optimizer, name, warmup, num_training_steps)
    try:
        return get_scheduler(name, optimizer, num_warmup_steps=warmup, num_training_steps=num_training_steps,
                             num_cycles=args.lr_scheduler_num_cycles, power=args.lr_scheduler_power)
    except ValueError as e:  # e.g. polynomial's end lr (1e-7) not below --learning_rate
        raise UserError(f"--lr_scheduler {name}: {e}") from e


def _transformers_scheduler(args, optimizer, name: str, warmup: int, num_training_steps: int):
    from transformers import optimization

    min_ratio = getattr(args, "lr_scheduler_min_lr_ratio", None) or 0.0
    if name == "inverse_sqrt":
        return optimization.get_inverse_sqrt_schedule(optimizer, num_warmup_steps=warmup,
                                                      timescale=getattr(args, "lr_scheduler_timescale", None) or None)
    if name == "cosine_with_min_lr":
        return optimization.get_cosine_with_min_lr_schedule_with_warmup(
            optimizer, num_warmup_steps=warmup, num_training_steps=num_training_steps, min_lr_rate=min_ratio)
    decay = resolve_warmup_steps(getattr(args, "lr_decay_steps", 0), num_training_steps, "--lr_decay_steps")
    if warmup + decay > num_training_steps:
        raise UserError(f"--lr_warmup_steps ({warmup}) and --lr_decay_steps ({decay}) exceed the {num_training_steps} "
                        "training steps")
    return optimization.get_wsd_schedule(optimizer, num_warmup_steps=warmup, num_decay_steps=decay,
                                         num_stable_steps=num_training_steps - warmup - decay, min_lr_ratio=min_ratio)


def _is_relative_step_adafactor(optimizer) -> bool:
    inner = optimizer.optimizer if type(optimizer).__name__ == "AcceleratedOptimizer" else optimizer
    cls = type(inner)
    return (cls.__name__ == "Adafactor" and cls.__module__.startswith("transformers")
            and bool(inner.defaults.get("relative_step")))


def _adafactor_schedule(args, optimizer, name: str, warmup: int):
    from transformers.optimization import AdafactorSchedule

    if getattr(args, "lr_scheduler_type", "") or name not in ("constant", "adafactor") or warmup:
        raise UserError("Adafactor with relative_step=True sets its own learning rate: use --lr_scheduler "
                        "adafactor (or constant) without warmup, or pass --optimizer_args relative_step=False "
                        "to use a schedule")
    return AdafactorSchedule(optimizer, initial_lr=args.learning_rate or 0.0)


def _custom_scheduler(args, optimizer, name: str, warmup: int):
    path = args.lr_scheduler_type.strip()
    if name != "constant" or warmup:
        raise UserError(f"--lr_scheduler_type {path} replaces --lr_scheduler and --lr_warmup_steps; drop them")
    cls = _scheduler_class(path)
    kwargs = parse_key_values(args.lr_scheduler_args, "--lr_scheduler_args")
    try:
        return cls(optimizer, **kwargs)
    except (TypeError, ValueError) as e:
        raise UserError(f"--lr_scheduler_type {path} rejected --lr_scheduler_args {kwargs or ''}: {e}") from e


def _scheduler_class(path: str) -> type:
    module_name, _, class_name = path.rpartition(".")
    module_name = module_name or "torch.optim.lr_scheduler"
    try:
        module = importlib.import_module(module_name)
    except ImportError as e:
        raise UserError(f"--lr_scheduler_type {path}: cannot import `{module_name}` ({e})") from e
    cls = getattr(module, class_name, None)
    if not isinstance(cls, type):
        candidates = [n for n, v in vars(module).items() if isinstance(v, type)]
        raise UserError(f"--lr_scheduler_type {path}: `{module_name}` has no class `{class_name}`"
                        f"{did_you_mean(class_name, candidates)}")
    return cls

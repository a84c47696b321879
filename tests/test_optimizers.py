"""Optimizer factory (every named optimizer steps once), --optimizer_args, and LR schedules."""

import argparse
import math

import pytest
import torch

from library.errors import UserError
from library.training.lr_schedulers import (add_lr_scheduler_arguments, build_lr_scheduler,
                                            resolve_warmup_steps, steps_or_ratio)
from library.training.optimizers import (add_optimizer_arguments, build_optimizer, describe_optimizer,
                                         known_optimizer_names, parse_key_values, set_optimizer_train_mode)


def parse(flags):
    parser = argparse.ArgumentParser()
    add_optimizer_arguments(parser)
    add_lr_scheduler_arguments(parser)
    return parser.parse_args(flags)


def tiny_param():
    # 64x64 = 4096 elements: bitsandbytes' smallest size that gets 8-bit state
    return torch.nn.Parameter(torch.randn(64, 64, generator=torch.Generator().manual_seed(0)))


def step_once(optimizer, param):
    before = param.detach().clone()
    param.grad = torch.ones_like(param)
    optimizer.step()
    return (param.detach() - before).abs().max().item()


EXPECTED_CLASSES = {
    "AdamW": "torch.optim.adamw.AdamW",
    "AdamW8bit": "bitsandbytes.optim.adamw.AdamW8bit",
    "PagedAdamW": "bitsandbytes.optim.adamw.PagedAdamW",
    "PagedAdamW8bit": "bitsandbytes.optim.adamw.PagedAdamW8bit",
    "PagedAdamW32bit": "bitsandbytes.optim.adamw.PagedAdamW32bit",
    "Lion": "bitsandbytes.optim.lion.Lion",
    "Lion8bit": "bitsandbytes.optim.lion.Lion8bit",
    "PagedLion8bit": "bitsandbytes.optim.lion.PagedLion8bit",
    "SGDNesterov": "torch.optim.sgd.SGD",
    "SGDNesterov8bit": "bitsandbytes.optim.sgd.SGD8bit",
    "Prodigy": "prodigyopt.prodigy.Prodigy",
    "Adafactor": "transformers.optimization.Adafactor",
    "AdamWScheduleFree": "schedulefree.adamw_schedulefree.AdamWScheduleFree",
    "RAdamScheduleFree": "schedulefree.radam_schedulefree.RAdamScheduleFree",
    "SGDScheduleFree": "schedulefree.sgd_schedulefree.SGDScheduleFree",
}


def test_every_known_name_is_covered_here():
    assert sorted(known_optimizer_names()) == sorted(EXPECTED_CLASSES)


@pytest.mark.parametrize("name", sorted(EXPECTED_CLASSES))
def test_each_named_optimizer_builds_and_steps(name):
    param = tiny_param()
    args = parse(["--optimizer_type", name.lower(), "--learning_rate", "1e-3"])
    optimizer = build_optimizer(args, [{"params": [param], "lr": 1e-3}])
    cls = type(optimizer)
    assert f"{cls.__module__}.{cls.__name__}" == EXPECTED_CLASSES[name]
    steps = 6 if name == "RAdamScheduleFree" else 1  # RAdam's first steps are a silent warmup
    assert sum(step_once(optimizer, param) for _ in range(steps)) > 0
    if name.endswith("8bit"):
        assert any(v.dtype == torch.uint8 for v in optimizer.state[param].values() if torch.is_tensor(v))


def test_sgd_nesterov_defaults_momentum_and_forces_nesterov():
    optimizer = build_optimizer(parse(["--optimizer_type", "SGDNesterov"]), [tiny_param()])
    assert optimizer.defaults["momentum"] == 0.9 and optimizer.defaults["nesterov"] is True
    with pytest.raises(UserError, match="always uses nesterov=True"):
        args = parse(["--optimizer_type", "SGDNesterov", "--optimizer_args", "nesterov=False"])
        build_optimizer(args, [tiny_param()])


def test_optimizer_args_are_literals_and_reach_the_optimizer():
    args = parse(["--optimizer_args", "weight_decay=0.05", "betas=0.8,0.95", "foreach=false",
                  "--learning_rate", "3e-4"])
    optimizer = build_optimizer(args, [tiny_param()])
    assert optimizer.defaults["weight_decay"] == 0.05 and optimizer.defaults["betas"] == (0.8, 0.95)
    assert optimizer.defaults["foreach"] is False and optimizer.defaults["lr"] == 3e-4
    assert describe_optimizer(args, optimizer) == \
        "torch.optim.adamw.AdamW(weight_decay=0.05,betas=(0.8, 0.95),foreach=False)"
    assert parse_key_values(["name=cosine", "n=3", "x=[1, 2]"], "--f") == {"name": "cosine", "n": 3, "x": [1, 2]}


def test_per_group_learning_rates_are_kept():
    a, b = tiny_param(), tiny_param()
    groups = [{"params": [a], "lr": 1e-3}, {"params": [b]}]
    optimizer = build_optimizer(parse(["--learning_rate", "1e-4"]), groups)
    assert [group["lr"] for group in optimizer.param_groups] == [1e-3, 1e-4]


@pytest.mark.parametrize("flags, message", [
    (["--optimizer_type", "AdamW9bit"], "did you mean `AdamW8bit`"),
    (["--optimizer_type", "DAdaptAdam"], "Prodigy"),
    (["--optimizer_type", "no_such_module.Opt"], "cannot import `no_such_module`"),
    (["--optimizer_type", "torch.optim.NoSuchOpt"], "has no class `NoSuchOpt`"),
    (["--optimizer_args", "weight_decay"], "not key=value"),
    (["--optimizer_args", "weight_decay=0.1 eps=1e-6"], "several key=value"),
    (["--optimizer_args", "weight_decy=0.1"], "did you mean `weight_decay`"),
    (["--optimizer_args", "lr=0.1"], "--learning_rate"),
    (["--optimizer_args", "betas=0.9"], "rejected its arguments"),
])
def test_optimizer_mistakes_are_user_errors(flags, message):
    with pytest.raises(UserError, match=message):
        build_optimizer(parse(flags), [tiny_param()])


def test_dotted_path_and_torch_optim_name():
    optimizer = build_optimizer(parse(["--optimizer_type", "torch.optim.SGD", "--optimizer_args", "momentum=0.5"]),
                                [tiny_param()])
    assert type(optimizer) is torch.optim.SGD and optimizer.defaults["momentum"] == 0.5
    assert type(build_optimizer(parse(["--optimizer_type", "rmsprop"]), [tiny_param()])) is torch.optim.RMSprop


def test_adafactor_relative_step_uses_adafactor_schedule():
    from transformers.optimization import AdafactorSchedule

    param = tiny_param()
    args = parse(["--optimizer_type", "Adafactor", "--learning_rate", "1e-3"])
    optimizer = build_optimizer(args, [{"params": [param], "lr": 1e-3}])
    assert optimizer.defaults["relative_step"] is True and optimizer.param_groups[0]["lr"] is None
    scheduler = build_lr_scheduler(args, optimizer, 10)
    assert isinstance(scheduler, AdafactorSchedule) and scheduler.get_last_lr() == [1e-3]
    rms = param.detach().pow(2).mean().sqrt().item()
    step_once(optimizer, param)
    scheduler.step()
    # relative step at step 1: min(1e-2, 1/sqrt(1)) scaled by the parameter's RMS (scale_parameter=True)
    assert scheduler.get_last_lr()[0].item() == pytest.approx(1e-2 * rms, rel=1e-5)
    with pytest.raises(UserError, match="relative_step=True"):
        build_lr_scheduler(parse(["--optimizer_type", "Adafactor", "--lr_scheduler", "cosine"]), optimizer, 10)
    with pytest.raises(UserError, match="--unet_lr"):
        build_optimizer(args, [{"params": [tiny_param()], "lr": 1e-3}, {"params": [tiny_param()], "lr": 1e-4}])


def test_adafactor_without_relative_step_takes_a_schedule():
    args = parse(["--optimizer_type", "Adafactor", "--optimizer_args", "relative_step=False", "scale_parameter=False",
                  "--learning_rate", "1e-3", "--lr_scheduler", "linear"])
    optimizer = build_optimizer(args, [tiny_param()])
    scheduler = build_lr_scheduler(args, optimizer, 10)
    assert optimizer.param_groups[0]["lr"] == 1e-3 and type(scheduler).__name__ == "LambdaLR"
    with pytest.raises(UserError, match="only with --optimizer_type Adafactor"):
        build_lr_scheduler(parse(["--lr_scheduler", "adafactor"]), build_optimizer(parse([]), [tiny_param()]), 10)


def test_schedule_free_train_eval_mode_and_constant_schedule_only():
    args = parse(["--optimizer_type", "AdamWScheduleFree", "--learning_rate", "1e-3"])
    optimizer = build_optimizer(args, [tiny_param()])
    assert optimizer.param_groups[0]["train_mode"] is True
    set_optimizer_train_mode(optimizer, False)
    assert optimizer.param_groups[0]["train_mode"] is False
    set_optimizer_train_mode(optimizer, True)
    assert build_lr_scheduler(args, optimizer, 10).get_last_lr() == [1e-3]
    for flags in (["--lr_scheduler", "cosine"], ["--lr_scheduler", "constant_with_warmup", "--lr_warmup_steps", "2"]):
        with pytest.raises(UserError, match="schedule-free"):
            build_lr_scheduler(parse(["--optimizer_type", "AdamWScheduleFree", *flags]), optimizer, 10)
    adamw = build_optimizer(parse([]), [tiny_param()])
    set_optimizer_train_mode(adamw, False)  # no-op for ordinary optimizers
    assert "train_mode" not in adamw.param_groups[0]


# ----- learning-rate schedules --------------------------------------------------------------------
def lr_sequence(flags, steps=10, lr=1.0):
    args = parse(["--learning_rate", str(lr), *flags])
    optimizer = build_optimizer(args, [tiny_param()])
    scheduler = build_lr_scheduler(args, optimizer, steps)
    values = []
    for _ in range(steps):
        values.append(scheduler.get_last_lr()[0])
        optimizer.step()
        scheduler.step()
    return values


def test_warmup_steps_or_ratio():
    assert steps_or_ratio("10") == 10 and steps_or_ratio("0.1") == 0.1 and steps_or_ratio("5%") == 0.05
    assert steps_or_ratio("0") == 0 and steps_or_ratio("20.0") == 20
    assert resolve_warmup_steps(0.1, 95) == 9 and resolve_warmup_steps(12, 95) == 12 and resolve_warmup_steps(0, 5) == 0
    assert resolve_warmup_steps("25%", 10) == 2 and resolve_warmup_steps(10.0, 100) == 10
    for bad in ("1.5", "-2", "abc", "100%"):
        with pytest.raises(argparse.ArgumentTypeError):
            steps_or_ratio(bad)


def test_linear_schedule_with_warmup_ratio():
    values = lr_sequence(["--lr_scheduler", "linear", "--lr_warmup_steps", "0.2"])
    expected = [0.0, 0.5] + [(10 - k) / 8 for k in range(2, 10)]
    assert values == pytest.approx(expected)


def test_cosine_and_restarts_and_polynomial_over_ten_steps():
    cosine = lr_sequence(["--lr_scheduler", "cosine"])
    assert cosine == pytest.approx([0.5 * (1 + math.cos(math.pi * k / 10)) for k in range(10)])
    restarts = lr_sequence(["--lr_scheduler", "cosine_with_restarts", "--lr_scheduler_num_cycles", "2"])
    assert restarts == pytest.approx([0.5 * (1 + math.cos(math.pi * ((2 * k / 10) % 1))) for k in range(10)])
    poly = lr_sequence(["--lr_scheduler", "polynomial", "--lr_scheduler_power", "2"])
    assert poly == pytest.approx([(1 - 1e-7) * (1 - k / 10) ** 2 + 1e-7 for k in range(10)])
    assert lr_sequence(["--lr_scheduler", "constant_with_warmup", "--lr_warmup_steps", "4"], lr=2.0) == \
        pytest.approx([0.0, 0.5, 1.0, 1.5] + [2.0] * 6)


def test_custom_scheduler_class_with_args():
    values = lr_sequence(["--lr_scheduler_type", "StepLR", "--lr_scheduler_args", "step_size=3", "gamma=0.5"])
    assert values == pytest.approx([1, 1, 1, 0.5, 0.5, 0.5, 0.25, 0.25, 0.25, 0.125])
    dotted = lr_sequence(["--lr_scheduler_type", "torch.optim.lr_scheduler.ExponentialLR", "--lr_scheduler_args",
                          "gamma=0.5"], steps=3)
    assert dotted == pytest.approx([1, 0.5, 0.25])


@pytest.mark.parametrize("flags, message", [
    (["--lr_scheduler", "cosin"], "did you mean `cosine`"),
    (["--lr_scheduler", "constant", "--lr_warmup_steps", "3"], "constant_with_warmup"),
    (["--lr_scheduler", "linear", "--lr_scheduler_num_cycles", "3"], "only by cosine_with_restarts"),
    (["--lr_scheduler", "cosine", "--lr_scheduler_power", "2"], "only by polynomial"),
    (["--lr_scheduler", "linear", "--lr_warmup_steps", "20"], "more than the 10"),
    (["--lr_scheduler_args", "T_max=3"], "is for --lr_scheduler_type"),
    (["--lr_scheduler_type", "StepLR", "--lr_scheduler", "cosine"], "replaces --lr_scheduler"),
    (["--lr_scheduler_type", "StepLR", "--lr_scheduler_args", "step_sise=3"], "rejected"),
    (["--lr_scheduler_type", "StepLRR"], "did you mean `StepLR`"),
    (["--lr_scheduler", "polynomial", "--learning_rate", "1e-8"], "polynomial"),
])
def test_schedule_mistakes_are_user_errors(flags, message):
    args = parse(flags)
    optimizer = build_optimizer(args, [tiny_param()])
    with pytest.raises(UserError, match=message):
        build_lr_scheduler(args, optimizer, 10)

"""The model-choosing options every command shares (``streamvae.model_args``)."""

from __future__ import annotations

import argparse
import doctest

import pytest
import torch

import streamvae.model_args
from streamvae.model_args import (
    CONFIGS,
    DTYPES,
    NO_WEIGHTS_HELP,
    add_model_arguments,
    model_from_args,
)


def parse(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    add_model_arguments(parser)
    return parser.parse_args(list(argv))


def test_docstring_example_runs():
    result = doctest.testmod(streamvae.model_args)
    assert result.failed == 0 and result.attempted > 0


def test_random_weights_build_the_named_config_in_the_dtype():
    choice = model_from_args(
        parse(
            "--random-weights",
            "--config",
            "wan2.2-narrow8",
            "--device",
            "cpu",
            "--dtype",
            "bfloat16",
        )
    )
    assert choice.random and "RANDOM WEIGHTS" in choice.label and "meaningless" in choice.label
    assert choice.encoder.config == CONFIGS["wan2.2-narrow8"]
    assert choice.encoder.dtype == DTYPES["bfloat16"] == torch.bfloat16
    assert choice.encoder.device.type == "cpu"


def test_the_seed_chooses_the_weights():
    a, b = (
        model_from_args(
            parse("--random-weights", "--config", "narrow8", "--device", "cpu", "--seed", s)
        )
        for s in ("0", "1")
    )
    first = next(iter(a.encoder.state_dict()))
    assert not torch.equal(a.encoder.state_dict()[first], b.encoder.state_dict()[first])


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        ((), NO_WEIGHTS_HELP),
        (
            ("--weights", "W.pth", "--random-weights"),
            "give --weights or --random-weights, not both",
        ),
        (("--weights", "W.pth", "--config", "narrow8"), "--config applies to --random-weights"),
    ],
)
def test_bad_choices_exit_saying_why(argv, message):
    with pytest.raises(SystemExit) as raised:
        model_from_args(parse(*argv, "--device", "cpu"))
    assert message in str(raised.value)


def test_unknown_choices_are_refused_by_the_parser(capsys):
    with pytest.raises(SystemExit):
        parse("--random-weights", "--config", "wan9")
    assert "invalid choice: 'wan9'" in capsys.readouterr().err

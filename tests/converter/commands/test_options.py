"""Flags and option dataclasses: each default lives in its dataclass field, the commands take
their flags' defaults from there and build the dataclass by field name, and the flags two
commands share are one definition."""

from __future__ import annotations

import argparse
from dataclasses import MISSING, fields

import pytest

from converter.calibration.text import CalibrationInput, TextOptions
from converter.commands import convert, heal
from converter.commands.options import default, options_from
from converter.conversion.options import ConvertOptions
from converter.heal.options import FROM_CONVERT, HealOptions, heal_after_convert

REQUIRED = {
    ConvertOptions: ["--src", "s", "--dst", "d"],
    HealOptions: ["--teacher", "t", "--student", "s", "--dst", "d", "--tokens", "7"],
}
PARSERS = {ConvertOptions: convert.build_parser, HealOptions: heal.build_parser}
NO_FLAG = {ConvertOptions: {"batch_size"}, HealOptions: set()}  # fields set only in code


def actions(parser: argparse.ArgumentParser) -> dict[str, argparse.Action]:
    return {a.dest: a for a in parser._actions}


@pytest.mark.parametrize("options", [ConvertOptions, HealOptions], ids=lambda o: o.__name__)
def test_every_field_has_its_flag_with_the_fields_default(options):
    parsed = actions(PARSERS[options]())
    for f in fields(options):
        if f.name in NO_FLAG[options]:
            assert f.name not in parsed
            continue
        assert f.name in parsed, f"{options.__name__}.{f.name} has no flag"
        if f.default is not MISSING:
            assert parsed[f.name].default == f.default, f.name


@pytest.mark.parametrize("options", [ConvertOptions, HealOptions], ids=lambda o: o.__name__)
def test_the_parsed_flags_build_the_dataclass_by_field_name(options):
    args = PARSERS[options]().parse_args(REQUIRED[options])
    given = {f.name: getattr(args, f.name) for f in fields(options) if f.default is MISSING}
    assert options_from(options, args) == options(**given)  # untouched flags: the defaults
    changed = PARSERS[options]().parse_args(
        [*REQUIRED[options], "--calib-field", "body", "--calib-chat", "--device", "cpu"]
    )
    built = options_from(options, changed)
    assert (built.calib_field, built.calib_chat, built.device) == ("body", True, "cpu")


def test_convert_flags_reach_convert_options():
    args = convert.build_parser().parse_args(
        [*REQUIRED[ConvertOptions], "--calib-samples", "9", "--freqfold", "2", "--resume"]
    )
    opts = options_from(ConvertOptions, args, freqfold=2)
    assert (opts.calib_samples, opts.freqfold, opts.resume) == (9, 2, True)


def test_default_names_a_field_with_a_default():
    assert default(HealOptions, "lr") == HealOptions(teacher="t", student="s", dst="d", tokens=1).lr
    with pytest.raises(TypeError, match="no plain default"):
        default(HealOptions, "teacher")
    with pytest.raises(TypeError, match="no field"):
        default(HealOptions, "learning_rate")


def test_text_flags_are_one_definition_shared_by_convert_and_heal():
    names = [f"--{f.name.replace('_', '-')}" for f in fields(TextOptions)]
    convert_flags, heal_flags = (
        {a.option_strings[0]: a for a in parser()._actions if a.option_strings}
        for parser in (convert.build_parser, heal.build_parser)
    )
    for name in names:
        a, b = convert_flags[name], heal_flags[name]
        assert (a.dest, a.default, a.const, a.nargs, a.metavar) == (
            b.dest,
            b.default,
            b.const,
            b.nargs,
            b.metavar,
        ), name
    # and the text options default to what CalibrationInput does with nothing given
    assert TextOptions().text_input == CalibrationInput()


def test_convert_then_heal_carries_the_shared_options():
    """--heal-tokens: the heal gets convert's text, device, output and hub options, heal's own
    defaults for the rest (not convert's batch_size, which means something else)."""
    for name in FROM_CONVERT:
        assert default(ConvertOptions, name) == default(HealOptions, name), name
    convert_opts = ConvertOptions(
        src="s",
        dst="out",
        calib_jsonl="docs.jsonl",
        calib_field="body",
        calib_chat=True,
        device="cpu",
        max_shard_size="1GB",
        overwrite=True,
        resume=True,
        revision="v1",
        batch_size=3,
    )
    opts = heal_after_convert(convert_opts, "teacher", ".out.converted", tokens=64)
    assert {n: getattr(opts, n) for n in FROM_CONVERT} == {
        n: getattr(convert_opts, n) for n in FROM_CONVERT
    }
    assert (opts.teacher, opts.student, opts.dst, opts.tokens) == (
        "teacher",
        ".out.converted",
        "out",
        64,
    )
    assert opts.batch_size == default(HealOptions, "batch_size")
    assert opts.train == default(HealOptions, "train")
    assert heal_after_convert(convert_opts, "t", "s", tokens=1, train="all").train == "all"

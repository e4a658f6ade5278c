from __future__ import annotations

import argparse
import json

import pytest

from textual_inversion_ext.core.create import CreateParams
from textual_inversion_ext.core.params import (
    ParameterError,
    add_arguments,
    fields_of,
    from_namespace,
    from_record,
    json_schema,
    to_record,
    validate,
)
from textual_inversion_ext.core.training.train_params import TrainParams


def parse(cls, argv):
    parser = argparse.ArgumentParser()
    add_arguments(parser, cls)
    return from_namespace(cls, parser.parse_args(argv))


def test_every_train_param_becomes_a_flag_with_its_default():
    defaults = parse(TrainParams, [])
    assert defaults == TrainParams()
    assert defaults.learn_rate == "0.005"


def test_flags_set_values_and_booleans_have_no_forms():
    p = parse(TrainParams, ["--batch-size", "4", "--no-scale-lr", "--learn-rate", "0.05:50, 0.005",
                            "--latent-sampling", "random", "--tag-dropout", "0.25"])
    assert (p.batch_size, p.scale_lr, p.learn_rate, p.latent_sampling, p.tag_dropout) == (
        4, False, "0.05:50, 0.005", "random", 0.25)


def test_bounds_and_choices_are_enforced():
    with pytest.raises(ParameterError, match="Batch size"):
        validate(TrainParams(batch_size=0))
    with pytest.raises(ParameterError, match="Tag dropout"):
        validate(TrainParams(tag_dropout=1.5))
    with pytest.raises(SystemExit):  # argparse refuses a value outside the choices
        parse(TrainParams, ["--precision", "fp8"])


def test_help_text_mentions_label_default_and_range(capsys):
    parser = argparse.ArgumentParser()
    add_arguments(parser, TrainParams)
    parser.print_help()
    text = capsys.readouterr().out
    assert "--max-steps" in text and "Default: 3000" in text and "Range 1" in text


def test_record_round_trip_and_unknown_keys():
    p = TrainParams(max_steps=77, flip_p=0.5)
    record = json.loads(json.dumps(to_record(p)))
    assert from_record(TrainParams, record) == p
    with pytest.raises(ParameterError, match="max_stpes"):
        from_record(TrainParams, {"max_stpes": 5})


def test_json_schema_has_every_field():
    schema = json_schema(CreateParams)
    names = {f.name for f in fields_of(CreateParams)}
    assert set(schema["properties"]) == names
    assert schema["properties"]["num_vectors"]["maximum"] == 75
    assert schema["properties"]["init_mode"]["enum"] == ["pool", "truncate", "spread", "zeros"]

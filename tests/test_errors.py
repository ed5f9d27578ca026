"""Every user mistake is one line `fedpeft: error: ...`, exit status 2, no traceback: the table of
tests/bad_inputs.py through `fedpeft.cli.main`, every float setting with NaN and inf, and property-based
fuzzing of the settings loader (any input gives a RunConfig or a FedPeftError, never another exception)."""

from __future__ import annotations

import dataclasses
import json
import math

import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

from bad_inputs import CASES, tiny_run_argv
from fedpeft.cli import main
from fedpeft.config import RunConfig, read_settings
from fedpeft.errors import FedPeftError


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("template") / "run"
    assert main(tiny_run_argv(out)) == 0
    return out


@pytest.mark.parametrize("name, build, words", CASES, ids=[c[0] for c in CASES])
def test_mistake_is_one_line_and_exit_2(name, build, words, finished_run, tmp_path, capsys):
    argv = build(tmp_path, finished_run)
    capsys.readouterr()
    code = main(argv)
    err = capsys.readouterr().err.strip()
    assert code == 2, err
    assert len(err.splitlines()) == 1 and err.startswith("fedpeft: error: "), err
    assert "Traceback" not in err
    for word in words:
        assert word in err, (word, err)


FLOATS = [f for f in dataclasses.fields(RunConfig) if str(f.type) == "float"]


@pytest.mark.parametrize("value", [math.nan, math.inf, -math.inf])
@pytest.mark.parametrize("name", [f.name for f in FLOATS])
def test_every_float_setting_refuses_nan_and_inf(name, value):
    """NaN never; +inf only where the setting says it means something (--dp-clip inf: no clipping)."""
    flag = "--" + name.replace("_", "-")
    if value == math.inf and RunConfig.__dataclass_fields__[name].metadata.get("infinite"):
        assert getattr(RunConfig(**{name: value}), name) == math.inf
        return
    with pytest.raises(FedPeftError, match=f"{flag} must be a finite number"):
        RunConfig(**{name: value})


def test_wrong_types_name_the_setting():
    for values, words in [({"threads": 1.5}, "--threads must be a whole number"),
                          ({"global_rounds": True}, "--global-rounds must be a whole number"),
                          ({"tasks": "sst2"}, "--tasks must be a list of strings"),
                          ({"tasks": ["sst2", 3.5]}, "--tasks must be a list of strings"),
                          ({"quiet": "yes"}, "--quiet must be true or false"),
                          ({"output_dir": 7}, "--output-dir must be a string"),
                          ({"lr": "fast"}, "--lr must be a number"),
                          ({"lr": 10 ** 400}, "--lr must be a finite number")]:
        with pytest.raises(FedPeftError, match=words):
            RunConfig.from_dict(values)
    cfg = RunConfig.from_dict({"lr": 1, "layer_budgets": [1, 2, 4], "tasks": ("sst2",)})
    assert cfg.lr == 1.0 and isinstance(cfg.lr, float) and cfg.layer_budgets == ["1", "2", "4"]
    assert cfg.tasks == ["sst2"]


def test_python_310_reads_toml_with_tomli(monkeypatch, tmp_path):
    """Python 3.10 has no tomllib: the loader falls back to tomli (a dependency there only)."""
    import builtins

    real_import = builtins.__import__

    def no_tomllib(name, *args, **kwargs):
        if name == "tomllib":
            raise ModuleNotFoundError("No module named 'tomllib'")
        return real_import(name, *args, **kwargs)

    pytest.importorskip("tomli")
    monkeypatch.setattr(builtins, "__import__", no_tomllib)
    (tmp_path / "run.toml").write_text('method = "fedit"\nglobal_rounds = 4\n')
    assert read_settings(tmp_path / "run.toml") == {"method": "fedit", "global_rounds": 4}


# ------------------------------------------------------------------ fuzzing the settings loader
NAMES = [f.name for f in dataclasses.fields(RunConfig)]
scalars = st.one_of(st.none(), st.booleans(), st.integers(), st.floats(allow_nan=True, allow_infinity=True),
                    st.text(max_size=12))
values = st.recursive(scalars, lambda inner: st.one_of(st.lists(inner, max_size=4),
                                                       st.dictionaries(st.text(max_size=6), inner, max_size=3)),
                      max_leaves=8)
keys = st.one_of(st.sampled_from(NAMES), st.sampled_from([n.replace("_", "-") for n in NAMES]), st.text(max_size=10))
FUZZ = settings(max_examples=300, deadline=None, database=None,  # no .hypothesis/ folder in the checkout
                suppress_health_check=[HealthCheck.function_scoped_fixture])


def _loads(settings_dict):
    try:
        cfg = RunConfig.from_dict(settings_dict, source="fuzz")
    except FedPeftError:
        return None
    assert isinstance(cfg, RunConfig)
    cfg.to_dict(), cfg.samples_for_tasks(), cfg.parse_layer_budgets(), cfg.shaping_settings()
    return cfg


@FUZZ
@given(st.dictionaries(keys, values, max_size=6))
def test_fuzz_settings_dict_gives_a_config_or_a_fedpeft_error(settings_dict):
    _loads(settings_dict)


@FUZZ
@given(st.one_of(values, st.dictionaries(keys, values, max_size=6)))
def test_fuzz_json_settings_file(tmp_path, value):
    path = tmp_path / "fuzz.json"
    path.write_text(json.dumps(value))
    try:
        _loads(read_settings(path))
    except FedPeftError:
        pass


@FUZZ
@given(st.one_of(st.binary(max_size=200),
                 st.lists(st.tuples(st.sampled_from(NAMES + ["run", "x-y"]),
                                    st.sampled_from(['1', '1.5', 'nan', '-inf', '"sst2"', '["a", 1]', 'true',
                                                     '[1, [2]]', '{a = 1}', '"', '1979-05-27', '0x1F', '1e400'])),
                          max_size=6).map(lambda kv: "\n".join(f"{k} = {v}" for k, v in kv).encode())))
def test_fuzz_toml_settings_file(tmp_path, raw):
    path = tmp_path / "fuzz.toml"
    path.write_bytes(raw)
    try:
        _loads(read_settings(path))
    except FedPeftError:
        pass

"""configurator.py: config files, --key=value, types and one-line errors."""

import pytest

from configurator import UserError, configure, knob_comments

DEFAULTS = {"learning_rate": 1e-3, "max_iters": 100, "compile": "auto", "dataset": "tinystories",
            "tie_embeddings": True, "expert_groups": (), "n_experts": 0}


def test_key_values_parse_as_literals():
    cfg = configure(["--max_iters=5", "--learning_rate=3e-4", "--tie_embeddings=False",
                     "--expert_groups=[(4, 256), (4, 512)]"], DEFAULTS)
    assert cfg["max_iters"] == 5 and cfg["learning_rate"] == 3e-4 and cfg["tie_embeddings"] is False
    assert cfg["expert_groups"] == ((4, 256), (4, 512))


def test_int_for_float_knob_is_accepted():
    cfg = configure(["--learning_rate=1"], DEFAULTS)
    assert cfg["learning_rate"] == 1.0 and isinstance(cfg["learning_rate"], float)


def test_bare_flag_sets_a_bool():
    assert configure(["--tie_embeddings=False", "--tie_embeddings"], DEFAULTS)["tie_embeddings"] is True


def test_string_knob_takes_the_text():
    assert configure(["--dataset=2024", "--compile=False"], DEFAULTS)["dataset"] == "2024"
    assert configure(["--compile=False"], DEFAULTS)["compile"] == "False"


@pytest.mark.parametrize("arg, message", [
    ("--learning_rat=1", "unknown config key 'learning_rat'; did you mean learning_rate?"),
    ("--max_iters=1.5", "max_iters expects an int (like 100), got 1.5"),
    ("--max_iters=lots", "max_iters: cannot parse 'lots' as an int"),
    ("--learning_rate=fast", "learning_rate: cannot parse 'fast' as a float"),
    ("--tie_embeddings=1", "tie_embeddings expects a bool"),
    ("--max_iters", "expected --max_iters=value"),
    ("missing/config.py", "config file not found: missing/config.py"),
])
def test_errors_are_one_clear_line(arg, message):
    with pytest.raises(UserError) as e:
        configure([arg], DEFAULTS)
    assert message in str(e.value) and "\n" not in str(e.value)


def test_config_file_with_include(tmp_path):
    (tmp_path / "base.py").write_text("n_experts = 4\nmax_iters = 50\n")
    (tmp_path / "child.py").write_text('include("base.py")\nn_experts = 8\n')
    cfg = configure([str(tmp_path / "child.py"), "--max_iters=7"], DEFAULTS)
    assert cfg["n_experts"] == 8 and cfg["max_iters"] == 7


def test_config_file_errors(tmp_path):
    (tmp_path / "typo.py").write_text("n_expert = 4\n")
    with pytest.raises(UserError, match="did you mean n_experts"):
        configure([str(tmp_path / "typo.py")], DEFAULTS)
    (tmp_path / "broken.py").write_text("n_experts = (\n")
    with pytest.raises(UserError, match="error in config file"):
        configure([str(tmp_path / "broken.py")], DEFAULTS)


def test_knob_comments_are_those_of_module_and_class_level_names(tmp_path):
    (tmp_path / "script.py").write_text(
        "def f():\n    steps = 3  # a local variable, not a knob\n\n"
        "steps = 1  # optimizer steps\nrate = 0.1\n\n"
        "class Config:\n    width: int = 8  # model width\n")
    assert knob_comments(str(tmp_path / "script.py")) == {"steps": "optimizer steps", "width": "model width"}

"""sempa_dist.config: YAML + overrides -> typed Config, error messages, validate(), describe(), flatten()."""

from __future__ import annotations

import dataclasses
import re
import textwrap
import typing

import pytest

from sempa_dist.config import (
    DEFAULT_TEMPLATE,
    Config,
    ConfigError,
    DataConfig,
    LoraConfig,
    describe,
    flatten,
    load_config,
)


def write_yaml(tmp_path, text: str, name: str = "run.yaml"):
    path = tmp_path / name
    path.write_text(textwrap.dedent(text).lstrip("\n"), encoding="utf-8")
    return path


def leaf_keys(cls: type = Config, prefix: str = "") -> list[str]:
    out = []
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        tp = hints[f.name]
        if dataclasses.is_dataclass(tp):
            out.extend(leaf_keys(tp, f"{prefix}{f.name}."))
        else:
            out.append(f"{prefix}{f.name}")
    return out


# ----------------------------------------------------------------------------------------------
# Defaults


def test_defaults_load_and_validate():
    cfg = load_config()
    assert cfg == Config()
    assert cfg.model.name == "tiny-llama"
    assert cfg.model.lora == LoraConfig()
    assert cfg.model.lora.target_modules == ["all-linear"]
    assert cfg.data.source == "bundled"
    assert cfg.data.rejected_columns == ["hard_neg"]
    assert cfg.data.template == DEFAULT_TEMPLATE
    assert cfg.data.num_rejected == 1
    assert cfg.packing.max_tokens == 2048
    assert cfg.loss.type == "dpo" and cfg.loss.beta == 0.1
    assert cfg.train.max_steps is None and cfg.train.global_batch_size == 32
    assert cfg.validate() is cfg
    assert cfg.validate(world_size=8) is cfg


def test_default_lists_are_not_shared_between_instances():
    a, b = Config(), Config()
    a.data.rejected_columns.append("x")
    a.model.lora.target_modules.append("q_proj")
    assert b.data.rejected_columns == ["hard_neg"]
    assert b.model.lora.target_modules == ["all-linear"]
    assert DataConfig().rejected_columns == ["hard_neg"]


def test_empty_file_and_empty_section_give_defaults(tmp_path):
    assert load_config(write_yaml(tmp_path, "", "empty.yaml")) == Config()
    assert load_config(write_yaml(tmp_path, "data:\nloss:\n", "sections.yaml")) == Config()


# ----------------------------------------------------------------------------------------------
# File + overrides


def test_file_then_overrides(tmp_path):
    path = write_yaml(tmp_path, """
        model:
          lora:
            enabled: true
            r: 4
        data:
          num_rejected: 3
          max_length: 128
        loss:
          type: plackett_luce
          beta: 0.2
        train:
          max_steps: 10
    """)
    cfg = load_config(path, [
        "loss.beta=0.5",                           # overrides the file
        "model.lora.r=16",                         # nested, overrides the file
        "model.lora.alpha=64",                     # nested, not in the file
        "data.rejected_columns=neg_a, neg_b,neg_c",  # comma list
        "model.lora.target_modules=[q_proj, v_proj]",  # YAML list
        "train.max_steps=null",                    # null overrides the file's 10
        "data.system_prompt=null",
    ])
    assert cfg.model.lora.enabled is True
    assert cfg.model.lora.r == 16
    assert cfg.model.lora.alpha == 64
    assert cfg.data.num_rejected == 3 and cfg.data.max_length == 128
    assert cfg.loss.type == "plackett_luce"
    assert cfg.loss.beta == 0.5
    assert cfg.data.rejected_columns == ["neg_a", "neg_b", "neg_c"]
    assert cfg.model.lora.target_modules == ["q_proj", "v_proj"]
    assert cfg.train.max_steps is None
    assert cfg.data.system_prompt is None
    # untouched keys keep their defaults
    assert cfg.train.seed == 42 and cfg.packing.layout == "packed"
    cfg.validate(world_size=4)


def test_int_for_float_becomes_float_and_numbers_for_str_become_text():
    cfg = load_config(None, ["loss.beta=1", "train.output_dir=123", "data.max_examples=7"])
    assert cfg.loss.beta == 1.0 and type(cfg.loss.beta) is float
    assert cfg.train.output_dir == "123"
    assert cfg.data.max_examples == 7


@pytest.mark.parametrize("text", ["1e-4", "1E-4", "+1e-4", "1.0e-4", "0.0001"])
def test_scientific_float_without_dot_is_a_float(tmp_path, text):
    # PyYAML (YAML 1.1) reads `1e-4` as the string '1e-4'; a learning rate written so must still load.
    assert load_config(None, [f"train.learning_rate={text}"]).train.learning_rate == pytest.approx(1e-4)
    path = write_yaml(tmp_path, f"train:\n  learning_rate: {text}\n")
    assert load_config(path).train.learning_rate == pytest.approx(1e-4)


def test_text_overrides_are_taken_verbatim():
    cfg = load_config(None, [
        'data.template=Rewrite: "{sentence}"',  # YAML would read a mapping
        "train.resume=1.10",                    # YAML would read the float 1.1
        "model.name=yes",                       # YAML 1.1 would read True
        "data.system_prompt=Be brief: please",
    ])
    assert cfg.data.template == 'Rewrite: "{sentence}"'
    assert cfg.train.resume == "1.10"
    assert cfg.model.name == "yes"
    assert cfg.data.system_prompt == "Be brief: please"
    cfg.validate()


def test_empty_override_value_is_empty_string_and_empty_list():
    cfg = load_config(None, ["train.output_dir=", "model.lora.target_modules="])
    assert cfg.train.output_dir == ""
    assert cfg.model.lora.target_modules == []


def test_override_value_may_contain_equals_sign():
    cfg = load_config(None, ["data.template=a=b {sentence}"])
    assert cfg.data.template == "a=b {sentence}"


# ----------------------------------------------------------------------------------------------
# Errors name the key, and file:line for keys from a file


def test_unknown_key_in_file_names_file_line_key_and_suggestion(tmp_path):
    path = write_yaml(tmp_path, """
        model:
          name: tiny-llama
        data:
          source: bundled
          num_rejectd: 3
    """)
    with pytest.raises(ConfigError) as ei:
        load_config(path)
    msg = str(ei.value)
    assert f"{path}:5" in msg
    assert "data.num_rejectd" in msg
    assert "did you mean data.num_rejected?" in msg


def test_unknown_section_in_file(tmp_path):
    path = write_yaml(tmp_path, "trian:\n  seed: 1\n")
    with pytest.raises(ConfigError, match=re.escape(f"{path}:1: trian: unknown key (did you mean train?)")):
        load_config(path)


def test_unknown_key_without_close_match_lists_known_keys(tmp_path):
    path = write_yaml(tmp_path, "packing:\n  layout: packed\n  zzzzzz: 1\n")
    with pytest.raises(ConfigError) as ei:
        load_config(path)
    msg = str(ei.value)
    assert f"{path}:3" in msg and "packing.zzzzzz" in msg
    assert "known: layout, max_tokens" in msg


def test_unknown_key_in_override_names_the_command_line():
    with pytest.raises(ConfigError) as ei:
        load_config(None, ["loss.betta=0.2"])
    msg = str(ei.value)
    assert "command line (loss.betta=0.2)" in msg
    assert "loss.betta" in msg and "did you mean loss.beta?" in msg


@pytest.mark.parametrize(
    ("yaml_value", "expected", "shown"),
    [
        ("abc", "expected int", "'abc'"),   # string for int
        ("true", "expected int", "True"),   # bool for int
        ("1.5", "expected int", "1.5"),     # float for int
        ("[1, 2]", "expected int", "[1, 2]"),
        ("null", "expected int", "None"),   # null for a non-optional int
    ],
)
def test_wrong_type_for_int_in_file(tmp_path, yaml_value, expected, shown):
    path = write_yaml(tmp_path, f"train:\n  output_dir: runs/x\n  seed: {yaml_value}\n")
    with pytest.raises(ConfigError) as ei:
        load_config(path)
    msg = str(ei.value)
    assert msg.startswith(f"{path}:3: train.seed: {expected}")
    assert msg.endswith(f"got {shown}")


@pytest.mark.parametrize(
    ("override", "key", "expected"),
    [
        ("train.seed=abc", "train.seed", "expected int, got 'abc'"),
        ("train.seed=true", "train.seed", "expected int, got True"),
        ("train.seed=2.0", "train.seed", "expected int, got 2.0"),
        ("loss.beta=true", "loss.beta", "expected float, got True"),
        ("loss.beta=abc", "loss.beta", "expected float, got 'abc'"),
        ("loss.beta=nan", "loss.beta", "expected float, got 'nan'"),
        ("model.lora.enabled=1", "model.lora.enabled", "expected bool, got 1"),
        ("model.lora.enabled=maybe", "model.lora.enabled", "expected bool, got 'maybe'"),
        ("data.max_examples=ten", "data.max_examples", "expected int, got 'ten'"),
        ("data.num_rejected=null", "data.num_rejected", "expected int, got None"),
    ],
)
def test_wrong_type_in_override(override, key, expected):
    with pytest.raises(ConfigError) as ei:
        load_config(None, [override])
    assert str(ei.value) == f"command line ({override}): {key}: {expected}"


def test_optional_int_accepts_int_and_null():
    assert load_config(None, ["train.max_steps=5"]).train.max_steps == 5
    assert load_config(None, ["train.max_steps=5", "train.max_steps=null"]).train.max_steps is None


def test_wrong_list_item_type_names_the_lists_line(tmp_path):
    path = write_yaml(tmp_path, "data:\n  source: bundled\n  rejected_columns: [neg, {x: 1}]\n")
    with pytest.raises(ConfigError) as ei:
        load_config(path)
    msg = str(ei.value)
    assert f"{path}:3" in msg
    assert "data.rejected_columns[1]" in msg and "expected str" in msg


def test_list_field_rejects_a_mapping(tmp_path):
    path = write_yaml(tmp_path, "data:\n  rejected_columns: {a: b}\n")
    with pytest.raises(ConfigError, match=re.escape(f"{path}:2: data.rejected_columns: expected list of str")):
        load_config(path)


def test_invalid_literal_choice_in_file(tmp_path):
    path = write_yaml(tmp_path, "data:\n  overlong: cut\n")
    with pytest.raises(ConfigError) as ei:
        load_config(path)
    assert str(ei.value) == f"{path}:2: data.overlong: must be one of truncate, drop; got 'cut'"


def test_invalid_literal_choice_in_override():
    with pytest.raises(ConfigError) as ei:
        load_config(None, ["ref.mode=lora"])
    msg = str(ei.value)
    assert "command line (ref.mode=lora)" in msg
    assert "ref.mode: must be one of engine, adapter, precomputed; got 'lora'" in msg


def test_section_must_be_a_mapping(tmp_path):
    path = write_yaml(tmp_path, "model: tiny-llama\n")
    with pytest.raises(ConfigError, match=re.escape(f"{path}:1: model: expected a mapping, got 'tiny-llama'")):
        load_config(path)


@pytest.mark.parametrize("bad", ["train.seed", "train.seed 3", "=3", ""])
def test_override_without_equals_or_key(bad):
    with pytest.raises(ConfigError) as ei:
        load_config(None, [bad])
    assert f"override {bad!r}: expected key.sub=value" == str(ei.value)


def test_override_through_a_non_section():
    with pytest.raises(ConfigError) as ei:
        load_config(None, ["data.template.x=1"])
    assert str(ei.value) == "command line (data.template.x=1): data.template: expected str, got {'x': 1}"
    with pytest.raises(ConfigError, match=re.escape("override 'data.template.x=1': template is not a section")):
        load_config(None, ["data.template=t {sentence}", "data.template.x=1"])
    with pytest.raises(ConfigError, match=re.escape("command line (nosuch.key=1): nosuch: unknown key")):
        load_config(None, ["nosuch.key=1"])


def test_missing_file_invalid_yaml_and_non_mapping_top_level(tmp_path):
    with pytest.raises(ConfigError, match="config file not found: .*nope.yaml"):
        load_config(tmp_path / "nope.yaml")
    bad = write_yaml(tmp_path, "data:\n  source: [unclosed\n", "bad.yaml")
    with pytest.raises(ConfigError, match=re.escape(f"{bad}: invalid YAML")):
        load_config(bad)
    lst = write_yaml(tmp_path, "- a\n- b\n", "list.yaml")
    with pytest.raises(ConfigError, match=re.escape(f"{lst}: top level must be a mapping of sections, got list")):
        load_config(lst)


def test_config_error_is_a_value_error():
    assert issubclass(ConfigError, ValueError)


# ----------------------------------------------------------------------------------------------
# validate(): combinations


def validated(*overrides: str, world_size: int | None = None) -> Config:
    return load_config(None, list(overrides)).validate(world_size=world_size)


@pytest.mark.parametrize(
    "key",
    ["data.num_rejected", "data.max_length", "packing.max_tokens", "loss.logprob_chunk_tokens",
     "train.global_batch_size", "train.log_every", "train.nproc", "train.max_consecutive_skips",
     "deepspeed.timeout_s", "model.lora.r"],
)
@pytest.mark.parametrize("value", [0, -1])
def test_validate_positive_ints(key, value):
    with pytest.raises(ConfigError) as ei:
        validated(f"{key}={value}")
    assert str(ei.value) == f"{key}: must be > 0, got {value}"


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["loss.beta=0"], "loss.beta: must be > 0, got 0.0"),
        (["loss.beta=-0.1"], "loss.beta: must be > 0, got -0.1"),
        (["loss.label_smoothing=0.5"], "loss.label_smoothing: must be in [0, 0.5), got 0.5"),
        (["loss.label_smoothing=-0.01"], "loss.label_smoothing: must be in [0, 0.5), got -0.01"),
        (["loss.label_smoothing=0.1", "loss.type=ipo"], "loss.label_smoothing: only defined for loss.type=dpo, not 'ipo'"),
        (["train.learning_rate=0"], "train.learning_rate: must be > 0, got 0.0"),
        (["train.warmup_ratio=1"], "train.warmup_ratio: must be in [0, 1), got 1.0"),
        (["train.warmup_ratio=-0.1"], "train.warmup_ratio: must be in [0, 1), got -0.1"),
        (["train.max_steps=0"], "train.max_steps: must be > 0 or null, got 0"),
        (["train.save_every=-1"], "train.save_every: must be >= 0, got -1"),
        (["train.keep_checkpoints=0"], "train.keep_checkpoints: must be >= 1, got 0"),
        (["data.template=Paraphrase: {text}"], "data.template: must contain '{sentence}', got 'Paraphrase: {text}'"),
        (["ref.mode=adapter"], "ref.mode: 'adapter' needs model.lora.enabled=true"),
        (["model.lora.enabled=true", "model.lora.target_modules=[q_proj, lm_head]"],
         "model.lora.target_modules: ['q_proj', 'lm_head'] adapts the LM head"),
        (["ref.offload=nvme"], "ref.nvme_path: required when ref.offload=nvme"),
        (["data.source=file"], "data.path: required when data.source=file"),
        (["data.source=hub"], "data.path: required when data.source=hub"),
        (["train.num_epochs=0"], "train.num_epochs: must be > 0 when train.max_steps is null, got 0.0"),
        (["data.max_examples=0"], "data.max_examples: must be > 0 or null, got 0"),
        (["data.max_examples=-1"], "data.max_examples: must be > 0 or null, got -1"),
    ],
)
def test_validate_rules(overrides, message):
    cfg = load_config(None, overrides)  # loading alone succeeds: these are combination/range checks
    with pytest.raises(ConfigError) as ei:
        cfg.validate()
    assert str(ei.value).startswith(message)


@pytest.mark.parametrize(
    "overrides",
    [
        ["ref.mode=adapter", "model.lora.enabled=true"],
        ["model.lora.enabled=true", "model.lora.target_modules=[q_proj, v_proj]"],
        ["ref.offload=nvme", "ref.nvme_path=/tmp/nvme"],
        ["data.source=file", "data.path=x.csv"],
        ["loss.label_smoothing=0.1", "loss.type=dpo"],
        ["train.num_epochs=0", "train.max_steps=3"],
        ["train.warmup_ratio=0", "train.save_every=0", "data.max_examples=1"],
    ],
)
def test_validate_accepts_the_fixed_combination(overrides):
    validated(*overrides)


def test_packing_max_tokens_must_hold_one_example():
    validated("data.max_length=512", "data.num_rejected=3", "packing.max_tokens=2048")  # exactly 4 * 512
    with pytest.raises(ConfigError) as ei:
        validated("data.max_length=513", "data.num_rejected=3", "packing.max_tokens=2048")
    msg = str(ei.value)
    assert msg.startswith("packing.max_tokens: 2048 cannot hold one example")
    assert "data.num_rejected=3" in msg and "data.max_length=513" in msg
    # the step planner gives a padded micro-batch the same token budget
    with pytest.raises(ConfigError, match="cannot hold one example"):
        validated("data.max_length=513", "data.num_rejected=3", "packing.max_tokens=2048", "packing.layout=padded")


def test_global_batch_must_divide_by_world_size():
    validated("train.global_batch_size=32", world_size=4)
    validated("train.global_batch_size=32", world_size=1)
    with pytest.raises(ConfigError) as ei:
        validated("train.global_batch_size=32", world_size=3)
    assert str(ei.value) == "train.global_batch_size: 32 is not divisible by the world size 3"
    with pytest.raises(ConfigError, match="world size must be >= 1, got 0"):
        validated(world_size=0)
    validated("train.global_batch_size=30")  # no world size given: not checked


# ----------------------------------------------------------------------------------------------
# describe() and flatten()


def test_describe_mentions_every_leaf_key_with_help():
    lines = describe()
    text = "\n".join(lines)
    keys = leaf_keys()
    assert len(keys) == 76  # eval.select_best is the newest
    for key in keys:
        matching = [ln for ln in lines if ln.startswith(f"  {key} (")]
        assert len(matching) == 1, key
        assert re.search(r"\): \S", matching[0]), f"{key} has no help text: {matching[0]!r}"
    for section in ("model", "model.lora", "data", "packing", "loss", "ref", "train", "deepspeed"):
        assert any(ln.startswith(f"[{section}]  ") for ln in lines), section
    assert len(lines) == len(keys) + 10  # one header per section
    assert "  data.num_rejected (int, default 1): " in text
    assert "  train.max_steps (int or null, default None): " in text
    assert "  data.overlong (one of truncate, drop, default 'truncate'): " in text
    assert "  model.lora.target_modules (list of str, default ['all-linear']): " in text


def test_flatten():
    assert flatten({"a": {"b": 1, "c": {"d": [1, 2]}}, "e": None}) == {"a.b": 1, "a.c.d": [1, 2], "e": None}
    assert flatten({}) == {}
    flat = flatten(Config().to_dict())
    assert sorted(flat) == sorted(leaf_keys())
    assert flat["model.lora.r"] == 8
    assert flat["model.lora.target_modules"] == ["all-linear"]
    assert flat["data.max_examples"] is None
    assert flat["deepspeed.timeout_s"] == 1800


def test_to_dict_round_trips_through_yaml(tmp_path):
    import yaml

    cfg = load_config(None, ["loss.beta=0.3", "data.rejected_columns=a,b", "train.max_steps=7"])
    path = tmp_path / "dump.yaml"
    path.write_text(yaml.safe_dump(cfg.to_dict()), encoding="utf-8")
    assert load_config(path) == cfg


def test_on_off_choices_survive_yaml_booleans(tmp_path):
    """YAML 1.1 reads bare on/off as booleans; a choice field takes them as the words typed."""
    assert load_config(None, ["packing.prefix_sharing=off"]).packing.prefix_sharing == "off"
    assert load_config(None, ["packing.prefix_sharing=on"]).packing.prefix_sharing == "on"
    f = tmp_path / "c.yaml"
    f.write_text("packing:\n  prefix_sharing: off\n")
    assert load_config(f).packing.prefix_sharing == "off"
    with pytest.raises(ConfigError, match="packing.prefix_sharing: must be one of auto, on, off; got 'sometimes'"):
        load_config(None, ["packing.prefix_sharing=sometimes"])


def test_on_nonfinite_choice():
    assert validated("train.on_nonfinite=stop").train.on_nonfinite == "stop"
    with pytest.raises(ConfigError, match=re.escape("train.on_nonfinite: must be one of skip, stop; got 'ignore'")):
        validated("train.on_nonfinite=ignore")

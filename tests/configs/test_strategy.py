"""DistributedStrategy: Paddle's defaults, modes, presets, YAML round trips, error messages,
table merging, and agreement with ps/'s table spec."""
import configparser
import dataclasses
import subprocess
import sys
import typing
from pathlib import Path

import pydantic
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from shoal.configs import (CommMode, DistributedStrategy, EntryName, PresetError, SparseRuleName,
                           StrategyError, TableConfig, presets)
from shoal.configs.errors import ConfigError
from shoal.errors import ShoalError
from shoal.ps import spec as ps_spec

ROOT = Path(__file__).resolve().parents[2]

PADDLE_DEFAULTS = {
    "a_sync": True,
    "a_sync_configs.k_steps": -1, "a_sync_configs.max_merge_var_num": 1,
    "a_sync_configs.send_queue_size": 16, "a_sync_configs.independent_recv_thread": False,
    "a_sync_configs.min_send_grad_num_before_recv": 1, "a_sync_configs.thread_pool_size": 1,
    "a_sync_configs.send_wait_times": 1, "a_sync_configs.runtime_split_send_recv": False,
    "a_sync_configs.launch_barrier": True, "a_sync_configs.lr_decay_steps": 10,
    "a_sync_configs.use_ps_gpu": False, "a_sync_configs.half_async": False,
    "amp": False, "amp_configs.init_loss_scaling": 32768.0, "amp_configs.incr_every_n_steps": 1000,
    "amp_configs.decr_every_n_nan_or_inf": 2, "amp_configs.incr_ratio": 2.0,
    "amp_configs.decr_ratio": 0.8, "amp_configs.use_dynamic_loss_scaling": True,
    "amp_configs.custom_white_list": [], "amp_configs.custom_black_list": [],
    "amp_configs.use_pure_fp16": False,
    "recompute": False, "recompute_configs.checkpoints": [],
    "gradient_merge": False, "gradient_merge_configs.k_steps": 1, "gradient_merge_configs.avg": True,
    "sharding": False, "sharding_configs.sharding_degree": 8, "sharding_configs.stage": 1,
    "sharding_configs.hybrid_dp": False,
    "pipeline": False, "pipeline_configs.micro_batch_size": 1, "pipeline_configs.accumulate_steps": 1,
    "pipeline_configs.schedule_mode": "1F1B",
    "lars": False, "lars_configs.lars_coeff": 0.001, "lars_configs.lars_weight_decay": 0.0005,
    "lars_configs.epsilon": 0.0, "lars_configs.exclude_from_weight_decay": [],
    "lamb": False, "lamb_configs.lamb_weight_decay": 0.01, "lamb_configs.exclude_from_weight_decay": [],
    "localsgd": False, "localsgd_configs.k_steps": 1, "localsgd_configs.begin_step": 1,
    "fuse_all_reduce_ops": True, "fuse_grad_size_in_MB": 32,
    "sparse_table.default.dim": None, "sparse_table.default.shards": 4, "sparse_table.default.seed": 0,
    "sparse_table.tables": {},
}
TABLE_DEFAULTS = {
    "accessor.nonclk_coeff": 0.1, "accessor.click_coeff": 1.0, "accessor.base_threshold": 1.5,
    "accessor.delta_threshold": 0.25, "accessor.delta_keep_days": 16,
    "accessor.show_click_decay_rate": 0.98, "accessor.delete_threshold": 0.8,
    "accessor.delete_after_unseen_days": 30, "accessor.embedx_threshold": None,
    "accessor.scale_by_show": True,
    "rule.name": "adagrad", "rule.learning_rate": 0.05, "rule.initial_g2sum": 3.0,
    "rule.initial_range": 1e-4, "rule.weight_bounds": (-10.0, 10.0), "rule.beta1": 0.9,
    "rule.beta2": 0.999, "rule.epsilon": 1e-8,
    "entry.name": "none", "entry.count": 1, "entry.probability": 1.0, "entry.threshold": 0.0,
}


def get(obj, dotted):
    for part in dotted.split("."):
        obj = getattr(obj, part)
    return obj


def problem(excinfo) -> str:
    return str(excinfo.value)


# --- defaults and modes ------------------------------------------------------------------------

@pytest.mark.parametrize("path,value", sorted(PADDLE_DEFAULTS.items()))
def test_defaults_are_paddles(path, value):
    assert get(DistributedStrategy(), path) == value


@pytest.mark.parametrize("path,value", sorted(TABLE_DEFAULTS.items()))
def test_table_defaults_are_paddles_and_the_specs(path, value):
    assert get(DistributedStrategy().sparse_table.default, path) == value


def test_table_defaults_equal_sparse_table_spec_defaults():
    spec_defaults = {f.name: f.default for f in dataclasses.fields(ps_spec.SparseTableSpec)
                     if f.default is not dataclasses.MISSING}
    assert TableConfig().spec_fields() == spec_defaults


@pytest.mark.parametrize("a_sync,k_steps,half_async,mode", [
    (False, -1, False, CommMode.SYNC),
    (False, 0, False, CommMode.SYNC),
    (False, 100, False, CommMode.SYNC),
    (True, -1, False, CommMode.ASYNC),
    (True, 0, False, CommMode.ASYNC),
    (True, 1, False, CommMode.GEO),
    (True, 800, False, CommMode.GEO),
    (True, -1, True, CommMode.HALF_ASYNC),
    (True, 0, True, CommMode.HALF_ASYNC),
])
def test_communicator_mode_follows_paddles_mapping(a_sync, k_steps, half_async, mode):
    s = DistributedStrategy(a_sync=a_sync, a_sync_configs={"k_steps": k_steps, "half_async": half_async})
    assert s.communicator_mode is mode


def test_default_strategy_is_async():
    assert DistributedStrategy().communicator_mode is CommMode.ASYNC


@pytest.mark.parametrize("data,fields", [
    ({"a_sync": False, "a_sync_configs": {"half_async": True}}, ["a_sync=false", "half_async"]),
    ({"a_sync_configs": {"half_async": True, "k_steps": 100}}, ["k_steps=100", "half_async"]),
])
def test_half_async_contradictions_name_both_fields(data, fields):
    with pytest.raises(StrategyError) as e:
        DistributedStrategy.from_dict(data)
    for f in fields:
        assert f in problem(e)
    assert "a_sync_configs.half_async" in problem(e)


def test_contradiction_points_at_the_line_of_half_async():
    text = "a_sync: false\na_sync_configs:\n  k_steps: -1\n  half_async: true\n"
    with pytest.raises(StrategyError) as e:
        DistributedStrategy.from_yaml(text)
    assert "a_sync_configs.half_async (YAML text, line 4)" in problem(e)


def test_contradicting_assignment_raises_and_changes_nothing():
    s = DistributedStrategy(a_sync_configs={"half_async": True})
    with pytest.raises(StrategyError, match="contradicts a_sync=false"):
        s.a_sync = False
    assert s.a_sync is True and s.communicator_mode is CommMode.HALF_ASYNC


def test_in_place_contradiction_is_caught_by_communicator_mode():
    s = DistributedStrategy(a_sync=False)
    s.a_sync_configs.half_async = True    # the parent cannot see a child's assignment
    with pytest.raises(StrategyError, match="half_async"):
        s.communicator_mode


@pytest.mark.parametrize("cfg,match", [({"half_async": True}, "use_ps_gpu=true .pass mode. contradicts a_sync_configs.half_async"),
                                       ({"k_steps": 10}, "contradicts a_sync_configs.k_steps=10 .GEO")])
def test_pass_mode_contradicts_half_async_and_geo(cfg, match):
    with pytest.raises(StrategyError, match=match):
        DistributedStrategy(a_sync=True, a_sync_configs=dict(use_ps_gpu=True, **cfg))


@pytest.mark.parametrize("a_sync", [True, False])
def test_use_ps_gpu_is_pass_mode_with_either_a_sync(a_sync):
    s = DistributedStrategy(a_sync=a_sync, a_sync_configs={"use_ps_gpu": True})
    assert s.communicator_mode is CommMode.PASS


def test_lars_and_lamb_contradict():
    with pytest.raises(StrategyError, match="lars=true contradicts lamb=true"):
        DistributedStrategy(lars=True, lamb=True)


# --- presets -----------------------------------------------------------------------------------

PRESET_MODES = {"ps_sync": CommMode.SYNC, "ps_async": CommMode.ASYNC,
                "ps_half_async": CommMode.HALF_ASYNC, "ps_geo": CommMode.GEO,
                "ps_pass": CommMode.PASS, "collective_dp": CommMode.SYNC,
                **{name: CommMode.SYNC for name in (
                    "sharding_stage1", "sharding_stage2", "pipeline_1f1b", "pipeline_fthenb",
                    "amp_o1", "amp_o2", "recompute", "lars", "lamb", "localsgd",
                    "gradient_merge")}}


def test_presets_lists_the_shipped_files():
    assert presets() == sorted(PRESET_MODES)


@pytest.mark.parametrize("name,mode", sorted(PRESET_MODES.items()))
def test_every_preset_loads_with_its_mode(name, mode):
    s = DistributedStrategy.load(name)
    assert s.communicator_mode is mode
    assert DistributedStrategy.from_yaml(s.to_yaml()) == s


def test_geo_preset_uses_a_paddle_k_steps():
    assert 100 <= DistributedStrategy.load("ps_geo").a_sync_configs.k_steps <= 800


def test_collective_preset_is_sync_with_fused_all_reduce():
    s = DistributedStrategy.load("collective_dp")
    assert s.a_sync is False and s.fuse_all_reduce_ops and s.fuse_grad_size_in_MB > 0


def test_unknown_preset_lists_the_presets_and_suggests():
    with pytest.raises(PresetError) as e:
        DistributedStrategy.load("ps_gio")
    for name in presets():
        assert name in problem(e)
    assert "did you mean 'ps_geo'" in problem(e)


def test_load_reads_a_yaml_file(tmp_path):
    path = tmp_path / "s.yaml"
    path.write_text("a_sync: false\n")
    assert DistributedStrategy.load(str(path)).communicator_mode is CommMode.SYNC
    assert DistributedStrategy.load(path).communicator_mode is CommMode.SYNC


def test_presets_are_declared_package_data():
    cfg = configparser.ConfigParser()
    cfg.read(ROOT / "setup.cfg")
    assert cfg["options.package_data"]["shoal.configs"].strip() == "presets/*.yaml"


# --- YAML round trips --------------------------------------------------------------------------

RICH = """\
a_sync: true
a_sync_configs:
  k_steps: 400
  send_queue_size: 32
sparse_table:
  default:
    rule:
      name: adam
      initial_range: 1e-3
      weight_bounds: [-5, 5]
    entry: {name: count_filter, count: 3}
  tables:
    user:
      dim: 8
      rule: {learning_rate: 0.1}
    item:
      accessor: {embedx_threshold: 2.0}
      shards: 16
amp: true
amp_configs:
  custom_white_list: [matmul]
pipeline_configs: {schedule_mode: FThenB}
"""


def test_yaml_round_trip_of_a_rich_strategy():
    s = DistributedStrategy.from_yaml(RICH)
    again = DistributedStrategy.from_yaml(s.to_yaml())
    assert again == s
    assert again.table_config("user") == s.table_config("user")
    assert DistributedStrategy.from_yaml(s.to_yaml(full=True)).table_config("user") == \
        s.table_config("user")


def test_yaml_floats_in_exponent_form_are_numbers():
    s = DistributedStrategy.from_yaml(RICH)
    assert s.sparse_table.default.rule.initial_range == 1e-3
    assert s.sparse_table.default.rule.weight_bounds == (-5.0, 5.0)


def test_to_yaml_writes_only_what_was_set():
    assert DistributedStrategy().to_yaml().strip() == "{}"
    s = DistributedStrategy()
    s.a_sync_configs.k_steps = 100           # an in-place edit of a group still gets written
    assert DistributedStrategy.from_yaml(s.to_yaml()).communicator_mode is CommMode.GEO


def test_dict_round_trip():
    s = DistributedStrategy.from_yaml(RICH)
    assert DistributedStrategy.from_dict(s.to_dict()) == s
    full = DistributedStrategy.from_dict(s.to_dict(full=True))
    assert full.to_dict(full=True) == s.to_dict(full=True)
    assert full.diff(s) == [] and full.table_config("user") == s.table_config("user")


def test_empty_yaml_is_the_default_strategy():
    assert DistributedStrategy.from_yaml("") == DistributedStrategy()
    assert DistributedStrategy.from_yaml("# nothing here\n") == DistributedStrategy()


strategies = st.builds(
    lambda a_sync, k, half, lr, rule, shards, wb, table_lr, amp_list, stage: DistributedStrategy(
        a_sync=a_sync or half, a_sync_configs={"k_steps": -1 if half else k, "half_async": half},
        sparse_table={"default": {"rule": {"name": rule, "learning_rate": lr, "weight_bounds": wb},
                                  "shards": shards},
                      "tables": {} if table_lr is None else {"t": {"rule": {"learning_rate": table_lr}}}},
        amp_configs={"custom_white_list": amp_list}, sharding_configs={"stage": stage}),
    st.booleans(), st.integers(-5, 1000), st.booleans(),
    st.floats(0, 10, allow_nan=False), st.sampled_from(typing.get_args(SparseRuleName)),
    st.integers(1, 256), st.tuples(st.floats(-100, -1), st.floats(1, 100)),
    st.none() | st.floats(0, 1), st.lists(st.text("abcdefgh_", min_size=1, max_size=8), max_size=3),
    st.sampled_from([1, 2]))


@settings(max_examples=60, deadline=None)
@given(strategies)
def test_yaml_round_trip_property(s):
    again = DistributedStrategy.from_yaml(s.to_yaml())
    assert again == s
    assert again.diff(s) == []
    assert again.communicator_mode is s.communicator_mode
    for name in ("t", "other"):
        assert again.table_config(name) == s.table_config(name)


# --- error messages ----------------------------------------------------------------------------

DEEP_TYPO = """\
a_sync: true
sparse_table:
  tables:
    user:
      rule:
        name: adam
        learnig_rate: 0.1
"""


def test_unknown_deep_key_names_path_file_line_choices_and_suggestion(tmp_path):
    path = tmp_path / "job.yaml"
    path.write_text(DEEP_TYPO)
    with pytest.raises(StrategyError) as e:
        DistributedStrategy.from_yaml(path)
    msg = problem(e)
    assert "sparse_table.tables.user.rule.learnig_rate" in msg
    assert f"{path}, line 7" in msg
    assert "valid keys of RuleConfig are: name, learning_rate, initial_g2sum" in msg
    assert "did you mean 'learning_rate'?" in msg


def test_unknown_key_in_text_has_its_line_and_suggestion():
    with pytest.raises(StrategyError) as e:
        DistributedStrategy.from_yaml("a_sync: true\na_sync_configs:\n  k_stepz: 100\n")
    assert "a_sync_configs.k_stepz (YAML text, line 3)" in problem(e)
    assert "did you mean 'k_steps'?" in problem(e)


def test_unknown_top_level_key_lists_the_strategy_fields():
    with pytest.raises(StrategyError) as e:
        DistributedStrategy.from_dict({"a_synk": True})
    assert "a_synk" in problem(e) and "did you mean 'a_sync'?" in problem(e)
    for field in DistributedStrategy.model_fields:
        assert field in problem(e)


@pytest.mark.parametrize("text,path,expected", [
    ("a_sync_configs:\n  k_steps: '100'\n", "a_sync_configs.k_steps (YAML text, line 2)",
     "expected integer, got string '100'"),
    ("a_sync: 1\n", "a_sync (YAML text, line 1)", "expected boolean, got integer 1"),
    ("sparse_table:\n  default:\n    rule:\n      learning_rate: fast\n",
     "sparse_table.default.rule.learning_rate (YAML text, line 4)", "expected number, got string 'fast'"),
    ("amp_configs:\n  custom_white_list:\n    - matmul\n    - 3\n",
     "amp_configs.custom_white_list[1] (YAML text, line 4)", "expected string, got integer 3"),
    ("a_sync_configs: 5\n", "a_sync_configs (YAML text, line 1)", "expected mapping (AsyncConfig)"),
])
def test_wrong_type_names_path_and_expected_type(text, path, expected):
    with pytest.raises(StrategyError) as e:
        DistributedStrategy.from_yaml(text)
    assert path in problem(e) and expected in problem(e)


def test_bad_literal_lists_the_choices_and_suggests():
    with pytest.raises(StrategyError) as e:
        DistributedStrategy.from_yaml("sparse_table:\n  default:\n    rule:\n      name: adagard\n")
    msg = problem(e)
    assert "sparse_table.default.rule.name (YAML text, line 4)" in msg
    assert "'naive', 'adagrad', 'std_adagrad', 'adam'" in msg and "did you mean 'adagrad'?" in msg


def test_bad_values_name_field_value_and_fix():
    with pytest.raises(StrategyError) as e:
        DistributedStrategy.from_dict({"sparse_table": {"default": {"rule": {"weight_bounds": [1, -1]}}},
                                       "a_sync_configs": {"max_merge_var_num": 0}})
    msg = problem(e)
    assert "weight_bounds=[1.0, -1.0]: min must be below max" in msg
    assert "a_sync_configs.max_merge_var_num: 0 is not allowed: Input should be greater than or " \
           "equal to 1" in msg


def test_every_problem_is_listed_in_file_order_and_chained():
    text = "fuse_grad_size_in_MB: 0\na_sync_configs:\n  bogus: 1\nsharding_configs: {stage: 3}\n"
    with pytest.raises(StrategyError) as e:
        DistributedStrategy.from_yaml(text)
    assert len(e.value.problems) == 3
    assert [p.split(" ")[0] for p in e.value.problems] == [
        "fuse_grad_size_in_MB", "a_sync_configs.bogus", "sharding_configs.stage"]
    assert isinstance(e.value.__cause__, pydantic.ValidationError)
    assert not isinstance(e.value, pydantic.ValidationError)
    assert isinstance(e.value, ConfigError) and isinstance(e.value, ShoalError)


@pytest.mark.parametrize("text,expected", [
    ("- a_sync\n- true\n", "the top level must be a mapping"),
    ("just a string", "the top level must be a mapping"),
    ("a_sync: true\na_sync: false\n", "line 2: duplicate key 'a_sync' (first given at line 1)"),
    ("a_sync_configs:\n  k_steps: 1\n  k_steps: 2\n", "line 3: duplicate key 'a_sync_configs.k_steps'"),
    ("a_sync: [true\nfuse_all_reduce_ops: false\n", "YAML syntax error"),
    ("a_sync: true\n---\na_sync: false\n", "YAML"),
])
def test_bad_yaml_documents(text, expected):
    with pytest.raises(StrategyError) as e:
        DistributedStrategy.from_yaml(text)
    assert expected in problem(e)


def test_syntax_error_has_its_line(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("a_sync: true\namp_configs:\n  custom_white_list: [a, b\n")
    with pytest.raises(StrategyError) as e:
        DistributedStrategy.from_yaml(path)
    assert f"{path}, line " in problem(e) and "YAML syntax error" in problem(e)


def test_missing_file_is_a_strategy_error(tmp_path):
    with pytest.raises(StrategyError, match="cannot read strategy file"):
        DistributedStrategy.from_yaml(str(tmp_path / "missing.yaml"))


def test_bad_assignment_is_a_strategy_error_and_changes_nothing():
    s = DistributedStrategy()
    with pytest.raises(StrategyError, match="k_steps: expected integer"):
        s.a_sync_configs.k_steps = "100"
    with pytest.raises(StrategyError, match="unknown key 'k_stepz'"):
        s.a_sync_configs = {"k_stepz": 1}
    assert s == DistributedStrategy()


def test_assigning_an_unknown_attribute_suggests_the_field():
    s = DistributedStrategy()
    with pytest.raises(StrategyError, match="unknown key 'a_synk'.*did you mean 'a_sync'"):
        s.a_synk = True
    with pytest.raises(StrategyError, match="valid keys of AsyncConfig"):
        s.a_sync_configs.ksteps = 3


def test_assigning_a_mapping_updates_only_its_keys_as_in_paddle():
    s = DistributedStrategy()
    s.a_sync_configs = {"k_steps": 100}
    s.a_sync_configs = {"send_queue_size": 4}
    assert s.a_sync_configs.k_steps == 100 and s.a_sync_configs.send_queue_size == 4
    assert s.communicator_mode is CommMode.GEO


# --- sparse tables -----------------------------------------------------------------------------

def test_table_override_of_one_field_keeps_the_default_blocks_others():
    s = DistributedStrategy.from_dict({"sparse_table": {
        "default": {"rule": {"name": "adam", "beta1": 0.8}, "entry": {"name": "count_filter", "count": 5},
                    "shards": 8},
        "tables": {"user": {"rule": {"learning_rate": 0.5}}}}})
    user = s.table_config("user")
    assert user.rule.learning_rate == 0.5
    assert (user.rule.name, user.rule.beta1, user.entry.count, user.shards) == ("adam", 0.8, 5, 8)
    assert s.table_config("anything_else") == s.sparse_table.default


def test_explicit_default_values_in_an_override_still_win():
    s = DistributedStrategy.from_dict({"sparse_table": {
        "default": {"rule": {"name": "adam"}}, "tables": {"t": {"rule": {"name": "adagrad"}}}}})
    assert s.table_config("t").rule.name == "adagrad"


def test_in_place_edit_of_an_override_counts_as_set():
    s = DistributedStrategy.from_dict({"sparse_table": {"default": {"rule": {"name": "adam"}},
                                                        "tables": {"t": {}}}})
    s.sparse_table.tables["t"].rule.learning_rate = 0.25
    t = s.table_config("t")
    assert (t.rule.name, t.rule.learning_rate) == ("adam", 0.25)


def test_an_override_that_merges_into_an_invalid_table_is_rejected():
    with pytest.raises(StrategyError, match="split embed_w/embedx layout needs dim >= 2"):
        DistributedStrategy.from_dict({"sparse_table": {
            "default": {"accessor": {"embedx_threshold": 1.0}}, "tables": {"t": {"dim": 1}}}})


def test_table_names_are_checked():
    with pytest.raises(StrategyError, match="without '/'"):
        DistributedStrategy.from_dict({"sparse_table": {"tables": {"a/b": {}}}})


def test_spec_fields_keys_are_sparse_table_spec_fields():
    fields = {f.name for f in dataclasses.fields(ps_spec.SparseTableSpec)}
    keys = set(TableConfig().spec_fields())
    assert keys <= fields
    assert keys == fields - {"name", "dim"}


def test_spec_fields_construct_a_sparse_table_spec():
    s = DistributedStrategy.from_yaml(RICH)
    for name in ("user", "item", "unnamed"):
        cfg = s.table_config(name)
        spec = ps_spec.SparseTableSpec(name="t", dim=4, **cfg.spec_fields())
        assert spec.rule == cfg.rule.name and spec.entry_count == cfg.entry.count
        assert spec.weight_bounds == cfg.rule.weight_bounds and isinstance(spec.weight_bounds, tuple)
    assert ps_spec.SparseTableSpec(name="t", dim=4, **TableConfig().spec_fields()) == \
        ps_spec.SparseTableSpec(name="t", dim=4)


def test_literal_names_agree_with_the_ps_registries():
    assert typing.get_args(SparseRuleName) == ps_spec.SPARSE_RULES
    assert typing.get_args(EntryName) == ps_spec.ENTRIES
    from shoal.configs._tables import EvictionName, StorageName
    from shoal.ps.tiers import tier_names
    assert typing.get_args(StorageName) == ps_spec.STORAGES == tier_names()
    assert typing.get_args(EvictionName) == ps_spec.EVICTIONS


# --- diff ----------------------------------------------------------------------------------------

def test_diff_names_the_differing_dotted_paths():
    a = DistributedStrategy.load("ps_geo")
    b = DistributedStrategy.load("ps_sync")
    assert a.diff(b) == ["a_sync", "a_sync_configs.k_steps"]
    assert a.diff(a) == []
    c = DistributedStrategy.from_dict({"sparse_table": {"tables": {"t": {"rule": {"learning_rate": 1.0}}}}})
    assert DistributedStrategy().diff(c) == ["sparse_table.tables.t"]
    d = DistributedStrategy.from_dict({"sparse_table": {"tables": {"t": {"rule": {"learning_rate": 2.0}}}}})
    assert c.diff(d) == ["sparse_table.tables.t.rule.learning_rate"]


# --- layering --------------------------------------------------------------------------------

def test_configs_imports_nothing_of_shoal_but_errors():
    # load shoal/configs with a bare `shoal` package, so shoal/__init__.py's own imports do not count
    code = (
        "import sys, types\n"
        f"pkg = types.ModuleType('shoal'); pkg.__path__ = [{str(ROOT / 'shoal')!r}]\n"
        "sys.modules['shoal'] = pkg\n"
        "import shoal.configs\n"
        "loaded = sorted(m for m in sys.modules if m.startswith('shoal.') and "
        "not m.startswith('shoal.configs'))\n"
        "print(loaded)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60,
                         cwd=ROOT)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "['shoal.errors']"


def test_import_shoal_configs_loads_no_ps_collective_or_launcher():
    code = ("import sys, shoal.configs\n"
            "print(sorted(m for m in sys.modules if m.split('.')[:2] in "
            "(['shoal', 'ps'], ['shoal', 'collective'], ['shoal', 'launcher'])))\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60,
                         cwd=ROOT)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"

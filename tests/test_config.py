"""Validation of VM files and host settings: every error names file, field and rule."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from fcq_tasks.cli import main
from fcq_tasks.config.settings import load_host_settings
from fcq_tasks.config.vmspec import (
    dump_vm_spec,
    parse_vm_file,
    parse_vm_text,
    rewrite_vm_parameters,
    vm_file_version,
)
from fcq_tasks.errors import ConfigError, ConfigErrors

GOOD = """\
name: test00
parameters:
  id: 12345
  resource_group: test
  online: true
  kvm_host: alpha
  disk: 5
  memory: 512
  cores: 1
  nics:
  - srv: 00-01-02-03-05-06
  - fe: 00-01-02-03-05-07
"""


def test_seed_example_parses() -> None:
    """The seed format from fc.qemu parses into typed values."""
    spec = parse_vm_text(GOOD, "test00.cfg")
    assert (spec.name, spec.id, spec.online, spec.kvm_host) == ("test00", 12345, True, "alpha")
    assert (spec.disk_gib, spec.memory_mb, spec.cores) == (5, 512, 1)
    assert [(n.net, n.mac) for n in spec.nics] == [("srv", "00:01:02:03:05:06"),
                                                   ("fe", "00:01:02:03:05:07")]
    assert spec.warnings == ()


# (replace this line of GOOD, with this, expected field, words of the rule)
BROKEN = [
    ("name: test00", "name: ../etc", "name", "a-z, 0-9"),
    ("name: test00", "name: 'test 00'", "name", "a-z, 0-9"),
    ("name: test00", "name: a/b", "name", "a-z, 0-9"),
    ("  id: 12345", "  id: -1", "parameters.id", "between"),
    ("  id: 12345", "  id: twelve", "parameters.id", "whole number"),
    ("  online: true", "  online: yes please", "parameters.online", "true or false"),
    ("  kvm_host: alpha", "  kvm_host: Alpha_1", "parameters.kvm_host", "a-z, 0-9"),
    ("  disk: 5", "  disk: 0", "parameters.disk", "between 1"),
    ("  disk: 5", "  disk: 5.5", "parameters.disk", "whole number"),
    ("  memory: 512", "  memory: 8", "parameters.memory", "between 32"),
    ("  memory: 512", "  memory: true", "parameters.memory", "whole number"),
    ("  cores: 1", "  cores: 0", "parameters.cores", "between 1"),
    ("  - srv: 00-01-02-03-05-06", "  - srv: 00-01-02-03-05", "parameters.nics.srv", "MAC"),
    ("  - srv: 00-01-02-03-05-06", "  - srv: 01-01-02-03-05-06", "parameters.nics.srv",
     "unicast"),
    ("  - fe: 00-01-02-03-05-07", "  - fe: 00-01-02-03-05-06", "parameters.nics.fe",
     "used twice"),
    ("  - srv: 00-01-02-03-05-06", "  - Srv!: 00-01-02-03-05-06", "parameters.nics.Srv!",
     "network names"),
    ("  resource_group: test\n", "", "parameters.resource_group", "required"),
]


@pytest.mark.parametrize(("old", "new", "field", "rule"), BROKEN)
def test_broken_vm_file_names_field_and_rule(tmp_path: Path, old: str, new: str, field: str,
                                             rule: str) -> None:
    """A broken VM file raises ConfigError with its path, the field and the rule broken."""
    assert old in GOOD
    path = tmp_path / "test00.cfg"
    path.write_text(GOOD.replace(old, new, 1))
    with pytest.raises(ConfigError) as info:
        parse_vm_file(path)
    assert info.value.file == str(path)
    assert info.value.field == field
    assert rule in info.value.rule


def test_name_must_match_file_name(tmp_path: Path) -> None:
    """vm02.cfg claiming to be test00 is refused: the file name is the VM's identity."""
    path = tmp_path / "vm02.cfg"
    path.write_text(GOOD)
    with pytest.raises(ConfigError, match="must match the file name"):
        parse_vm_file(path)


def test_not_yaml_and_not_a_mapping(tmp_path: Path) -> None:
    """Garbage and lists are refused at the top level, naming the file."""
    with pytest.raises(ConfigError, match="not valid YAML"):
        parse_vm_text("name: [unclosed", "x.cfg")
    with pytest.raises(ConfigError, match=r"\(top level\): must be a mapping"):
        parse_vm_text("- a\n- b\n", "x.cfg")


def test_unknown_keys_are_warnings() -> None:
    """Unknown keys don't break a VM but are reported by their dotted name."""
    spec = parse_vm_text(GOOD + "  memroy: 1024\nextra: 1\n", "test00.cfg")
    assert any("parameters.memroy" in w for w in spec.warnings)
    assert any("extra" in w for w in spec.warnings)


def test_version_key_orders_files(tmp_path: Path) -> None:
    """`version` is optional (absent: 0), a whole number, and survives dumping."""
    assert parse_vm_text(GOOD, "test00.cfg").version == 0
    spec = parse_vm_text("version: 7\n" + GOOD, "test00.cfg")
    assert spec.version == 7 and spec.warnings == ()
    assert parse_vm_text(dump_vm_spec(spec), "test00.cfg").version == 7
    path = tmp_path / "test00.cfg"
    assert vm_file_version(path) is None
    # The version of a file broken elsewhere is still known.
    path.write_text("version: 3\n" + GOOD.replace("disk: 5", "disk: -5"))
    assert vm_file_version(path) == 3


@pytest.mark.parametrize(("value", "rule"), [
    ("-1", "between 0"), ("seven", "whole number"), ("true", "whole number"),
    ("1.5", "whole number"), ("'3'", "whole number"), ("null", "whole number"),
])
def test_broken_version_names_field_and_rule(tmp_path: Path, value: str, rule: str) -> None:
    """A bad version is a ConfigError on field `version`, for parsing and for version reads."""
    path = tmp_path / "test00.cfg"
    path.write_text(f"version: {value}\n" + GOOD)
    for read in (parse_vm_file, vm_file_version):
        with pytest.raises(ConfigError) as info:
            read(path)
        assert (info.value.file, info.value.field) == (str(path), "version")
        assert rule in info.value.rule


def test_rewrite_vm_parameters_keeps_version_and_other_keys(tmp_path: Path) -> None:
    """fcq's own edit changes only the named parameters, atomically, keeping version."""
    path = tmp_path / "test00.cfg"
    path.write_text("version: 41\n" + GOOD + "  memroy: 1\nextra: {a: 1}\n")
    path.chmod(0o640)
    spec = rewrite_vm_parameters(path, kvm_host="beta")
    assert (spec.kvm_host, spec.version) == ("beta", 41)
    again = parse_vm_file(path)
    assert (again.kvm_host, again.version, again.memory_mb, again.nics) == (
        "beta", 41, 512, spec.nics)
    text = path.read_text()
    assert "memroy: 1" in text and "extra:" in text  # unknown keys are kept too
    assert path.stat().st_mode & 0o777 == 0o640
    assert sorted(p.name for p in tmp_path.iterdir()) == ["test00.cfg"]  # no temp file left


@pytest.mark.parametrize(("changes", "field", "rule"), [
    ({"kvm_host": "Beta_1"}, "parameters.kvm_host", "a-z, 0-9"),
    ({"kvm_hots": "beta"}, "parameters.kvm_hots", "not a parameter fcq knows"),
    ({"memory": 8}, "parameters.memory", "between 32"),
])
def test_rewrite_vm_parameters_refuses_bad_changes(tmp_path: Path, changes: dict[str, object],
                                                   field: str, rule: str) -> None:
    """A bad change is a ConfigError naming the field; the file stays as it was."""
    path = tmp_path / "test00.cfg"
    path.write_text("version: 2\n" + GOOD)
    with pytest.raises(ConfigError) as info:
        rewrite_vm_parameters(path, **changes)
    assert (info.value.field, rule in info.value.rule) == (field, True)
    assert path.read_text() == "version: 2\n" + GOOD


@pytest.mark.parametrize(("cluster", "field", "words"), [
    ({"request_ttl": 0}, "cluster.request_ttl", "between 1"),
    ({"request_ttl": "soon"}, "cluster.request_ttl", "whole number"),
    # 10 + 12 × (5 + 10) = 190 s of busy retries with the defaults.
    ({"request_ttl": 189}, "cluster.request_ttl", "= 190 s"),
    ({"request_ttl": 60, "task_busy_wait": 0, "busy_retry_delay": 5, "busy_retries": 13},
     "cluster.request_ttl", "= 65 s"),
])
def test_request_ttl_must_cover_the_busy_retry_chain(tmp_path: Path, cluster: dict[str, object],
                                                      field: str, words: str) -> None:
    """request_ttl is checked at load: a ttl shorter than the retry chain names both fields."""
    f = tmp_path / "host.yaml"
    f.write_text(yaml.safe_dump({"cluster": cluster}))
    with pytest.raises(ConfigError) as info:
        load_host_settings(f)
    assert info.value.field == field and words in info.value.rule
    if words.startswith("="):  # the chain rule names the fields that make the chain
        assert "cluster.task_busy_wait" in info.value.rule
        assert "cluster.busy_retries" in info.value.rule


def test_request_ttl_default_and_equal_to_chain(tmp_path: Path) -> None:
    """The default (900 s) exceeds the default chain; a ttl equal to the chain is accepted."""
    f = tmp_path / "host.yaml"
    f.write_text("host: alpha\n")
    c = load_host_settings(f).cluster
    assert (c.request_ttl, c.busy_retry_chain) == (900, 190)
    f.write_text(yaml.safe_dump({"cluster": {"request_ttl": 5, "task_busy_wait": 0,
                                             "busy_retry_delay": 1, "busy_retries": 5}}))
    assert load_host_settings(f).cluster.request_ttl == 5


def test_config_check_cli(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """`fcq config check` exits 0 for good files, 2 for broken ones, and writes nothing."""
    good = tmp_path / "test00.cfg"
    good.write_text(GOOD)
    bad = tmp_path / "vm02.cfg"
    bad.write_text(GOOD.replace("name: test00", "name: vm02").replace("disk: 5", "disk: -5"))
    before = sorted(p.name for p in tmp_path.iterdir())
    assert main(["config", "check", str(good)]) == 0
    assert main(["config", "check", str(good), str(bad)]) == 2
    err = capsys.readouterr().err
    assert "parameters.disk" in err and str(bad) in err
    strict = tmp_path / "test01.cfg"
    strict.write_text(GOOD.replace("name: test00", "name: test01") + "  memroy: 1\n")
    assert main(["config", "check", str(strict)]) == 0
    assert main(["config", "check", "--strict", str(strict)]) == 2
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([*before, "test01.cfg"])


def test_host_settings_defaults_and_overrides(tmp_path: Path) -> None:
    """Built-in defaults apply first; the file overrides only what it names."""
    f = tmp_path / "host.yaml"
    f.write_text("host: alpha\nrun_dir: /tmp/x/run\nshutdown_grace: 5\n")
    s = load_host_settings(f)
    assert (s.host, str(s.run_dir), s.shutdown_grace) == ("alpha", "/tmp/x/run", 5.0)
    assert str(s.vm_config_dir) == "/etc/qemu/vm"
    assert s.accelerator == "auto" and s.storage == "local"
    assert s.vm_max_total_memory > 0


@pytest.mark.parametrize(("text", "field", "rule"), [
    ("host: ../x\n", "host", "a-z"),
    ("run_dir: relative/dir\n", "run_dir", "absolute path"),
    ("state_dir: /var/../etc\n", "state_dir", "'..'"),
    ("accelerator: hvf\n", "accelerator", "auto, kvm, tcg"),
    ("shutdown_grace: -1\n", "shutdown_grace", "between"),
    ("vm_max_total_memory: lots\n", "vm_max_total_memory", "whole number"),
    ("create_vm: 'rbd create {name}'\n", "create_vm", "argv"),
    ("create_vm: [touch, '{nmae}']\n", "create_vm", "unknown placeholder"),
    ("direct_boot: {kernel: /k, initrd: /i, append: 'a\"b'}\n", "direct_boot.append", "quotes"),
])
def test_broken_host_settings(tmp_path: Path, text: str, field: str, rule: str) -> None:
    """A broken host setting raises ConfigError naming the file, setting and rule."""
    f = tmp_path / "host.yaml"
    f.write_text(text)
    with pytest.raises(ConfigError) as info:
        load_host_settings(f)
    assert (info.value.file, info.value.field) == (str(f), field)
    assert rule in info.value.rule


def test_unknown_host_setting_is_a_warning(tmp_path: Path) -> None:
    """A misspelt setting is reported, not silently ignored."""
    f = tmp_path / "host.yaml"
    f.write_text("shutdown_grase: 5\n")
    assert any("shutdown_grase" in w for w in load_host_settings(f).warnings)


@pytest.mark.parametrize(("settings", "field", "rule"), [
    ({"migration_timeout_max": 1800, "cluster": {"visibility_timeout": 1800}},
     "migration_timeout_max", "must be shorter than cluster.visibility_timeout"),
    ({"migration_timeout_max": 100, "migration_peer_grace": 50,
      "cluster": {"visibility_timeout": 120}},
     "migration_timeout_max", "(150 s) must be shorter than cluster.visibility_timeout"),
    ({"migration_heartbeat_ttl": 40, "migration_peer_grace": 60},
     "migration_peer_grace", "at least twice migration_heartbeat_ttl"),
])
def test_migration_that_could_outlive_the_visibility_timeout_is_refused(
        tmp_path: Path, settings: dict[str, object], field: str, rule: str) -> None:
    """A half running longer than the broker's visibility timeout would be delivered
    again while it runs: such settings are refused at load, naming the field."""
    path = tmp_path / "host.yaml"
    path.write_text(yaml.safe_dump({"host": "alpha", **settings}))
    with pytest.raises(ConfigError) as err:
        load_host_settings(path)
    assert err.value.field == field and rule in err.value.rule


def test_default_migration_settings_fit_the_default_visibility_timeout(tmp_path: Path) -> None:
    """The defaults load: 1500 s + 60 s of grace stay under 1800 s."""
    path = tmp_path / "host.yaml"
    path.write_text(yaml.safe_dump({"host": "alpha"}))
    s = load_host_settings(path)
    assert s.migration_timeout_max + s.migration_peer_grace < s.cluster.visibility_timeout


def test_config_check_reports_every_mistake_of_every_file(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """Five mistakes in one file are five lines; a directory checks its *.cfg files."""
    configs = tmp_path / "vm"
    configs.mkdir()
    five = configs / "vm05.cfg"
    five.write_text(GOOD.replace("name: test00", "name: vm05").replace("disk: 5", "disk: -5")
                    .replace("memory: 512", "memory: lots").replace("cores: 1", "cores: 0")
                    .replace("online: true", "online: maybe")
                    .replace("resource_group: test", "resource_group: 'a b'"))
    (configs / "test00.cfg").write_text(GOOD)
    (configs / "notes.txt").write_text("not a VM file")
    assert main(["config", "check", str(configs)]) == 2
    err = capsys.readouterr()
    lines = [line for line in err.err.splitlines() if line.startswith("fcq: error:")]
    fields = ["parameters.disk", "parameters.memory", "parameters.cores", "parameters.online",
              "parameters.resource_group"]
    assert len(lines) == 5, lines
    assert all(str(five) in line for line in lines)
    assert all(any(f in line for line in lines) for f in fields)
    assert "test00.cfg: ok" in err.out and "notes.txt" not in err.out + err.err
    # As JSON: one record per mistake, with file, field and rule.
    assert main(["--json", "config", "check", str(five)]) == 2
    records = json.loads(capsys.readouterr().out)
    assert sorted(r["field"] for r in records) == sorted(fields)
    assert all(r["file"] == str(five) and r["rule"] for r in records)
    empty = tmp_path / "empty"
    empty.mkdir()
    assert main(["config", "check", str(empty)]) == 2
    assert "without VM files" in capsys.readouterr().err


def test_host_settings_report_every_broken_setting(tmp_path: Path) -> None:
    f = tmp_path / "host.yaml"
    f.write_text("host: ../x\nshutdown_grace: -1\naccelerator: hvf\nqmp_timeout: soon\n")
    with pytest.raises(ConfigErrors) as info:
        load_host_settings(f)
    assert sorted(str(e.fields["field"]) for e in info.value.errors) == [
        "accelerator", "host", "qmp_timeout", "shutdown_grace"]
    # The worker refuses to start with the whole list, one line each.
    import subprocess
    import sys
    out = subprocess.run([sys.executable, "-m", "fcq_tasks", "-c", str(f), "worker"],
                         capture_output=True, text=True, timeout=60, check=False)
    assert out.returncode == 2
    assert len([x for x in out.stderr.splitlines() if x.startswith("fcq: error:")]) == 4


def test_config_check_reads_host_settings_files_too(tmp_path: Path,
                                                   capsys: pytest.CaptureFixture[str]) -> None:
    """A host's settings file is checked as settings, not as a VM file; its unknown
    top-level keys are warnings (errors with --strict), a bad value an error."""
    good = tmp_path / "host.yaml"
    good.write_text("host: alpha\nshutdown_grase: 5\n")
    assert main(["--json", "config", "check", str(good)]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["kind"] == "host settings" and out["host"] == "alpha"
    # --json after the subcommand means the same.
    assert main(["config", "check", str(good), "--json"]) == 0
    assert json.loads(capsys.readouterr().out) == out
    assert out["warnings"] == [f"{good}: shutdown_grase: unknown setting, ignored"]
    assert main(["config", "check", "--strict", str(good)]) == 2
    capsys.readouterr()
    bad = tmp_path / "bad.yaml"
    bad.write_text("host: alpha\ncluster:\n  broker_url: http://redis\n  visibilty_timeout: 5\n")
    assert main(["config", "check", str(bad)]) == 2
    err = capsys.readouterr().err
    # Inside a section a typo is an error: it would silently change what the
    # host talks to or trusts (docs/configuration.md).
    assert "cluster.visibilty_timeout: unknown setting" in err, err

"""durable.toml problems stop start-up with a message naming the file, the key and the problem."""

import subprocess
import sys
from pathlib import Path

import pytest
from durable.core.config import load_config
from durable.core.errors import ConfigError

from tests.helpers.settings import ROOT

GOOD = """
[bindings]
COUNTERS = "durable.objects.patterns.counter:Counter"

[[migrations]]
tag = "v1"
new_classes = ["Counter"]
"""


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "durable.toml"
    path.write_text(text)
    return path


def test_a_good_file_resolves_bindings_and_identities(tmp_path: Path) -> None:
    config = load_config(write(tmp_path, GOOD))
    binding = config.binding("COUNTERS")
    assert binding.class_name == "Counter" and binding.identity == "Counter"
    assert config.load_classes()["Counter"].__name__ == "Counter"


def test_malformed_toml_names_the_file(tmp_path: Path) -> None:
    path = write(tmp_path, "[bindings\nCOUNTERS = 1")
    with pytest.raises(ConfigError, match=f"{path}: malformed TOML"):
        load_config(path)


def test_an_unknown_key_is_named(tmp_path: Path) -> None:
    path = write(tmp_path, "bogus = 1\n" + GOOD)
    with pytest.raises(ConfigError, match=r"durable.toml: bogus: unknown key"):
        load_config(path)


def test_an_unknown_key_inside_a_migration_is_named(tmp_path: Path) -> None:
    path = write(tmp_path, GOOD.replace('tag = "v1"', 'tag = "v1"\nnew_klasses = ["X"]'))
    with pytest.raises(ConfigError, match=r"migrations.0.new_klasses: unknown key"):
        load_config(path)


def test_a_binding_to_a_class_no_migration_created_is_refused(tmp_path: Path) -> None:
    path = write(tmp_path, GOOD.replace('new_classes = ["Counter"]', 'new_classes = ["Other"]'))
    with pytest.raises(ConfigError, match=r"bindings.COUNTERS: class 'Counter' is not created by any migration"):
        load_config(path)


def test_a_class_that_cannot_be_imported_names_the_binding(tmp_path: Path) -> None:
    text = GOOD.replace("durable.objects.patterns.counter:Counter", "no.such.module:Counter")
    config = load_config(write(tmp_path, text))
    with pytest.raises(ConfigError, match=r"bindings.COUNTERS: class 'no.such.module:Counter' cannot be imported: "
                                          r"ModuleNotFoundError"):
        config.load_classes()


def test_renames_carry_the_identity_and_deletions_remove_the_class(tmp_path: Path) -> None:
    text = """
[bindings]
TALLIES = "durable.objects.patterns.counter:Counter"

[[migrations]]
tag = "v1"
new_classes = ["Tally", "Gone"]

[[migrations]]
tag = "v2"
renamed_classes = [{from = "Tally", to = "Counter"}]
deleted_classes = ["Gone"]
"""
    config = load_config(write(tmp_path, text))
    assert config.classes == {"Counter": "Tally"}
    assert config.binding("TALLIES").identity == "Tally"


def test_duplicate_migration_tags_are_refused(tmp_path: Path) -> None:
    path = write(tmp_path, GOOD + '\n[[migrations]]\ntag = "v1"\nnew_classes = ["B"]\n')
    with pytest.raises(ConfigError, match="duplicate tag"):
        load_config(path)


def test_durable_dev_stops_with_the_message_and_exit_code_2(tmp_path: Path) -> None:
    write(tmp_path, "bogus = 1\n" + GOOD)
    result = subprocess.run([sys.executable, "-m", "durable.cli", "dev"], cwd=tmp_path, capture_output=True,
                            text=True, timeout=60, env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"})
    assert result.returncode == 2
    assert "durable.toml: bogus: unknown key" in result.stderr


def test_durable_dev_refuses_an_unimportable_class_before_starting_servers(tmp_path: Path) -> None:
    write(tmp_path, GOOD.replace("durable.objects.patterns.counter:Counter", "services.nothing:Counter"))
    result = subprocess.run([sys.executable, "-m", "durable.cli", "dev"], cwd=tmp_path, capture_output=True,
                            text=True, timeout=60, env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"})
    assert result.returncode == 2
    assert "bindings.COUNTERS" in result.stderr and "cannot be imported" in result.stderr
    assert not (tmp_path / ".durable").exists()


def test_broken_settings_are_reported(tmp_path: Path) -> None:
    write(tmp_path, GOOD)
    result = subprocess.run([sys.executable, "-m", "durable.cli", "dev"], cwd=tmp_path, capture_output=True,
                            text=True, timeout=60,
                            env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin", "DURABLE_PARTITIONS": "zero"})
    assert result.returncode == 2
    assert "partitions" in result.stderr


# ----- the app's routing function and its folder ------------------------------------------------


def test_routes_must_name_a_function_as_module_colon_function(tmp_path: Path) -> None:
    path = write(tmp_path, 'routes = "app.fetch"\n' + GOOD)
    with pytest.raises(ConfigError, match=f"{path}: routes: 'app.fetch' must name a function as 'module:function'"):
        load_config(path)


def test_the_apps_folder_is_importable_for_its_classes_and_routes(tmp_path: Path) -> None:
    from durable.core.settings import Settings
    from durable.router.app import load_routes

    (tmp_path / "myapp_mod_x1.py").write_text(
        "from durable import DurableObject, Response\n"
        "class Thing(DurableObject):\n    pass\n"
        "async def fetch(request, env):\n    return Response('hi')\n")
    path = write(tmp_path, 'routes = "myapp_mod_x1:fetch"\n[bindings]\nTHINGS = "myapp_mod_x1:Thing"\n'
                           '[[migrations]]\ntag = "v1"\nnew_classes = ["Thing"]\n')
    config = load_config(path)
    assert config.routes == "myapp_mod_x1:fetch"
    assert config.load_classes()["Thing"].__name__ == "Thing"
    assert load_routes(Settings(config_file=path), config).__name__ == "fetch"


async def test_an_app_without_routes_answers_404_saying_how_to_add_them(tmp_path: Path) -> None:
    from durable.core.http import Request
    from durable.core.settings import Settings
    from durable.router.app import load_routes

    path = write(tmp_path, GOOD)
    fetch = load_routes(Settings(config_file=path), load_config(path))
    response = await fetch(Request("http://x/anything"), None)  # type: ignore[arg-type]
    assert response.status == 404 and b"add routes = " in response.body


def test_routes_that_cannot_be_imported_are_named(tmp_path: Path) -> None:
    from durable.core.settings import Settings
    from durable.router.app import load_routes

    path = write(tmp_path, 'routes = "no_such_module_q:fetch"\n' + GOOD)
    with pytest.raises(ConfigError, match=r"routes: 'no_such_module_q:fetch' cannot be imported: ModuleNotFoundError"):
        load_routes(Settings(config_file=path), load_config(path))


def test_a_missing_durable_toml_says_how_to_start(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="durable new counter"):
        load_config(tmp_path / "durable.toml")

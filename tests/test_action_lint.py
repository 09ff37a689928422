"""Static checks of the GitHub action and its workflows, with the linters users and GitHub's own
tooling run: check-jsonschema (SchemaStore's action and workflow schemas), actionlint (which also
reads action.yml through the self-test's `uses: ./`), zizmor (offline), hadolint. Each linter is
also shown to fail on a planted mistake, so a passing run means it really looked.
Plus the contracts between the files: every input mapped in runs.env and read by entrypoint.py,
the outputs written, livesend's dependencies all in the image's hashed lock."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml
from conftest import ROOT

ACTION = ROOT / "action.yml"
DOCKERFILE = ROOT / "Dockerfile"
WORKFLOWS = sorted((ROOT / ".github" / "workflows").glob("*.yml"))
EXAMPLES = sorted((ROOT / "examples" / "github").glob("*.yml"))


def run(*argv: str, cwd: Path = ROOT) -> subprocess.CompletedProcess:
    tool = shutil.which(argv[0])
    assert tool, f"{argv[0]} is not installed: run .ci/install-github.sh"
    return subprocess.run([tool, *argv[1:]], cwd=cwd, capture_output=True, text=True, timeout=120)


def assert_clean(result: subprocess.CompletedProcess) -> None:
    assert result.returncode == 0, result.stdout + result.stderr


def test_there_is_something_to_check():
    assert ACTION.exists() and DOCKERFILE.exists()
    assert [p.name for p in WORKFLOWS] == ["action-self-test.yml"]
    assert {p.name for p in EXAMPLES} == {"train.yml", "train-on-host.yml"}


# --- check-jsonschema -------------------------------------------------------------------------------


def test_action_yml_is_valid_by_the_github_actions_schema():
    assert_clean(run("check-jsonschema", "--builtin-schema", "vendor.github-actions", str(ACTION)))


def test_workflows_are_valid_by_the_github_workflows_schema():
    assert_clean(run("check-jsonschema", "--builtin-schema", "vendor.github-workflows", *map(str, WORKFLOWS + EXAMPLES)))


def test_check_jsonschema_catches_a_bad_branding_color(tmp_path):
    bad = tmp_path / "action.yml"
    bad.write_text(ACTION.read_text().replace("color: purple", "color: pink"))
    result = run("check-jsonschema", "--builtin-schema", "vendor.github-actions", str(bad))
    assert result.returncode == 1 and "'pink' is not one of" in result.stdout


# --- actionlint -------------------------------------------------------------------------------------


def test_actionlint_is_clean_on_the_self_test_and_the_examples():
    # With no arguments actionlint checks .github/workflows, where `uses: ./` makes it read action.yml
    # (required inputs, unknown inputs, runs keys, the Dockerfile's presence, branding).
    assert_clean(run("actionlint", "-no-color"))
    assert_clean(run("actionlint", "-no-color", *map(str, EXAMPLES)))


def test_actionlint_reads_action_yml_and_catches_an_unknown_input(tmp_path):
    project = tmp_path / "project"
    shutil.copytree(ROOT / ".github", project / ".github")
    for name in ("action.yml", "Dockerfile"):
        shutil.copy(ROOT / name, project / name)
    subprocess.run(["git", "init", "-q"], cwd=project, check=True)
    workflow = project / ".github" / "workflows" / "action-self-test.yml"
    workflow.write_text(workflow.read_text().replace("dry-run: true\n", "dry-run: true\n          bogus: 1\n", 1))
    result = run("actionlint", "-no-color", cwd=project)
    assert result.returncode == 1
    assert 'input "bogus" is not defined in action "livesend"' in result.stdout


# --- zizmor -----------------------------------------------------------------------------------------


def test_zizmor_is_clean():
    assert_clean(run("zizmor", "--offline", "--no-progress", str(ACTION), *map(str, WORKFLOWS + EXAMPLES)))


def test_zizmor_catches_template_injection(tmp_path):
    bad = tmp_path / "bad.yml"
    text = EXAMPLES[0].read_text()
    bad.write_text(text.replace('echo "The results are already committed."',
                                'echo "${{ github.event.head_commit.message }}"'))
    assert bad.read_text() != text
    result = run("zizmor", "--offline", "--no-progress", str(bad))
    assert result.returncode != 0 and "template-injection" in result.stdout + result.stderr


# --- hadolint ---------------------------------------------------------------------------------------


def test_hadolint_is_clean_on_the_dockerfile():
    assert_clean(run("hadolint", str(DOCKERFILE)))


def test_hadolint_catches_an_unpinned_apt_package(tmp_path):
    bad = tmp_path / "Dockerfile"
    bad.write_text(DOCKERFILE.read_text().replace("git=1:2.39.*", "git"))
    result = run("hadolint", "--no-color", str(bad))
    assert result.returncode == 1 and "DL3008" in result.stdout


# --- contracts between the files --------------------------------------------------------------------


def action() -> dict:
    return yaml.safe_load(ACTION.read_text())


def test_every_input_is_mapped_through_runs_env_and_read_by_the_entrypoint():
    spec = action()
    inputs = spec["inputs"]
    env = spec["runs"]["env"]
    entrypoint = (ROOT / "entrypoint.py").read_text()
    for name in inputs:
        assert re.fullmatch(r"[a-z][a-z0-9]*(-[a-z0-9]+)*", name), f"{name} is not kebab-case"
        assert name not in ("args", "entrypoint"), "reserved by the runner for container actions"
        var = "LIVESEND_ACTION_" + name.upper().replace("-", "_")
        assert env.get(var) == f"${{{{ inputs.{name} }}}}", var
        assert f'"{name}"' in entrypoint, f"entrypoint.py does not read the {name} input"
    assert set(env) == {"LIVESEND_ACTION_" + n.upper().replace("-", "_") for n in inputs}
    assert inputs["run"]["required"] is True
    assert [n for n, s in inputs.items() if s.get("required")] == ["run"]


def test_the_outputs_are_the_ones_the_entrypoint_writes():
    import importlib.util

    loader = importlib.util.spec_from_file_location("action_entrypoint", ROOT / "entrypoint.py")
    module = importlib.util.module_from_spec(loader)
    loader.loader.exec_module(module)
    written = module.outputs(0, {"name": "n", "baseline_sha": "a" * 40, "events_sent": 3})
    keys = [line.split("=", 1)[0] for line in written.splitlines()]
    assert keys == list(action()["outputs"]) == ["exit-code", "experiment-name", "baseline-sha", "events-sent"]


def test_the_image_lock_pins_every_runtime_dependency_with_hashes():
    """The image installs requirements/action.txt with --require-hashes and livesend with --no-deps:
    every dependency in pyproject.toml must be in the lock (see requirements/action.in to re-lock)."""
    import tomllib

    deps = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    names = {re.split(r"[<>=!~;\[ ]", d, maxsplit=1)[0].lower().replace("_", "-") for d in deps}
    lock = (ROOT / "requirements" / "action.txt").read_text()
    pinned = {m[1].lower(): m[2] for m in re.finditer(r"^([A-Za-z0-9_.-]+)==(\S+) \\$", lock, re.M)}
    assert names <= set(pinned), f"not in requirements/action.txt: {sorted(names - set(pinned))}"
    assert "setuptools" in pinned  # the build backend, installed without build isolation
    blocks = re.split(r"^(?=\S)", lock, flags=re.M)
    assert all("--hash=sha256:" in b for b in blocks if re.match(r"[A-Za-z0-9_.-]+==", b))


def test_dockerfile_and_dockerignore_fit_the_runner():
    text = DOCKERFILE.read_text()
    assert re.search(r"^FROM python:3\.\d+-slim", text, re.M)
    assert not re.search(r"^(USER|WORKDIR)\b", text, re.M)  # the runner needs root and mounts the workspace
    assert re.search(r'^ENTRYPOINT \["/', text, re.M)  # exec form, absolute path
    assert "--require-hashes -r /opt/livesend-src/requirements/action.txt" in text
    ignored = [line for line in (ROOT / ".dockerignore").read_text().splitlines() if line and not line.startswith("#")]
    assert ignored[0] == "*"  # an allow-list: only what the image needs goes into the build context
    for needed in ("entrypoint.py", "pyproject.toml", "livesend/", "requirements/action.txt"):
        assert f"!{needed}" in ignored


@pytest.mark.parametrize("path", EXAMPLES + WORKFLOWS, ids=lambda p: p.name)
def test_workflows_have_minimal_permissions(path):
    spec = yaml.safe_load(path.read_text())
    assert spec["permissions"] == {}
    for name, job in spec["jobs"].items():
        allowed = {"contents": "write"} if name == "commit" else {"contents": "read"}
        assert job["permissions"] == allowed, name
        assert "timeout-minutes" in job

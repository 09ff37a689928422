"""The GitLab CI files validate against GitLab's CI schema (check-jsonschema's vendored copy, run as the
real command), stay consistent with each other and with livesend's version, and keep the token out of
the component's inputs."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from conftest import ROOT

import livesend

TEMPLATE = ROOT / "gitlab" / "livesend.gitlab-ci.yml"
COMPONENT = ROOT / "templates" / "livesend.yml"
EXAMPLE = ROOT / "examples" / "gitlab" / ".gitlab-ci.yml"
DOCS = ROOT / "README.md"  # its "GitLab CI" section
COMPONENT_JOB = "$[[ inputs.job-name ]]"


def check_jsonschema(*paths: Path) -> subprocess.CompletedProcess:
    """`check-jsonschema --builtin-schema vendor.gitlab-ci` as the upstream pre-commit hook runs it."""
    return subprocess.run(
        [sys.executable, "-m", "check_jsonschema", "--builtin-schema", "vendor.gitlab-ci",
         "--data-transform", "gitlab-ci", "--regex-variant", "nonunicode", *map(str, paths)],
        capture_output=True, text=True, timeout=120,
    )


def split_documents(path: Path, out: Path) -> list:
    """A file with a `spec:` header is two YAML documents, which check-jsonschema cannot read as one
    (python-jsonschema/check-jsonschema#561): write each as its own JSON file."""
    docs = list(yaml.safe_load_all(path.read_text()))
    files = []
    for i, doc in enumerate(docs):
        files.append(out / f"{path.stem}-{i}.json")
        files[-1].write_text(json.dumps(doc))
    return files


def concrete(text: str) -> str:
    """The template with its hidden job made a real job: the schema checks real jobs only."""
    assert re.search(r"^\.livesend:$", text, re.M)
    return re.sub(r"^\.livesend:$", "livesend:", text, flags=re.M)


def test_template_and_example_validate(tmp_path):
    real_job = tmp_path / "template-as-job.yml"
    real_job.write_text(concrete(TEMPLATE.read_text()))
    result = check_jsonschema(TEMPLATE, real_job, EXAMPLE)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "ok -- validation done" in result.stdout


def test_component_documents_validate_each(tmp_path):
    files = split_documents(COMPONENT, tmp_path)
    assert len(files) == 2, "a spec header, `---`, then the job"
    header = json.loads(files[0].read_text())
    assert set(header) == {"spec"}
    result = check_jsonschema(*files)
    assert result.returncode == 0, result.stdout + result.stderr


def test_the_validator_rejects_a_broken_job(tmp_path):
    """Negative control: the same command fails on a mistake in the job and in the spec header."""
    broken = tmp_path / "broken.yml"
    broken.write_text(concrete(TEMPLATE.read_text()).replace("when: always", "when: sometimes"))
    result = check_jsonschema(broken)
    assert result.returncode == 1
    assert "'sometimes' is not one of" in result.stdout

    header, job = split_documents(COMPONENT, tmp_path)
    spec = json.loads(header.read_text())
    spec["spec"]["inputs"]["interval"]["type"] = "float"
    header.write_text(json.dumps(spec))
    result = check_jsonschema(header)
    assert result.returncode == 1
    assert "'float' is not one of" in result.stdout


def test_component_runs_the_same_script_as_the_hidden_job():
    template = yaml.safe_load(TEMPLATE.read_text())
    _, component = yaml.safe_load_all(COMPONENT.read_text())
    assert component[COMPONENT_JOB]["script"] == template[".livesend"]["script"]
    assert component[COMPONENT_JOB]["after_script"] == template[".livesend"]["after_script"]
    assert component[COMPONENT_JOB]["artifacts"]["when"] == template[".livesend"]["artifacts"]["when"] == "always"
    assert template[".livesend"]["artifacts"]["paths"] == ["dvclive/", "dvc.yaml"]


def test_hidden_job_sets_no_variables():
    """Job-level `variables:` would outrank the user's global `variables:`: defaults live in the script."""
    template = yaml.safe_load(TEMPLATE.read_text())
    assert set(template) == {".livesend"}
    assert "variables" not in template[".livesend"]
    assert "image" not in template[".livesend"] and "before_script" not in template[".livesend"]


def test_token_is_never_an_input():
    header, component = yaml.safe_load_all(COMPONENT.read_text())
    inputs = header["spec"]["inputs"]
    assert not [name for name in inputs if "token" in name.lower()]
    variables = component[COMPONENT_JOB]["variables"]
    assert not [k for k in variables if "TOKEN" in k]
    assert "run" in inputs and "default" not in inputs["run"], "the training command is mandatory"
    for name, spec in inputs.items():
        assert spec.get("description"), f"input {name} is undocumented"
    assert {inputs[n].get("type") for n in ("interval", "flush-timeout")} == {"number"}
    assert inputs["strict"].get("type") == inputs["comment"].get("type") == "boolean"


def test_default_version_matches_the_package():
    version = livesend.__version__
    defaults = re.findall(r"\$\{LIVESEND_INSTALL:-livesend==([^}]+)\}", TEMPLATE.read_text())
    assert defaults == [version] * 2, "the template installs the livesend of its own release (script, after_script)"
    header, component = yaml.safe_load_all(COMPONENT.read_text())
    assert header["spec"]["inputs"]["install"]["default"] == f"livesend=={version}"
    assert re.findall(r"\$\{LIVESEND_INSTALL:-livesend==([^}]+)\}", COMPONENT.read_text()) == [version] * 2
    example = yaml.safe_load(EXAMPLE.read_text())
    assert example["include"][0]["ref"] == f"v{version}"
    # every version named in the files and the docs: pins, refs, raw URLs, component references
    pattern = re.compile(r"livesend==(\d[\w.+-]*\w)|ref: v(\d[\w.]*\w)|/raw/v(\d[\w.]*\w)/|/livesend@v?(\d[\w.]*\w)")
    for path in (TEMPLATE, COMPONENT, EXAMPLE, DOCS):
        found = {next(g for g in m.groups() if g) for m in pattern.finditer(path.read_text())}
        assert found == {version}, f"{path.relative_to(ROOT)} names {found}, the package is {version}"


@pytest.mark.parametrize("path", [TEMPLATE, COMPONENT, EXAMPLE], ids=lambda p: p.name)
def test_no_secret_in_the_files(path):
    text = path.read_text()
    for token in ("STUDIO_TOKEN", "LIVESEND_GITLAB_TOKEN", "LIVESEND_GITHUB_TOKEN"):
        assert not re.search(rf"{token}\s*:", text), f"{token} is a masked CI/CD variable, never YAML"
    assert "set -x" not in text

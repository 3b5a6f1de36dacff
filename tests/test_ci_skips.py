"""The CI rule of tests/conftest.py: under CI=true a skipped `real_component` test fails the run;
other skips, and every skip outside CI, stay skips. Each case runs pytest on a small test file
with the project's conftest loaded as a plugin (-p tests.conftest)."""

from __future__ import annotations

import pytest

pytest_plugins = ["pytester"]

CASES = """
import shutil

import pytest


@pytest.mark.real_component
@pytest.mark.skipif(True, reason="pdsh/openssh not installed (pdsh missing)")
def test_real_skipif():
    pass


@pytest.fixture
def daemon():
    pytest.skip("Slurm/munge not installed (slurmd missing)")


@pytest.mark.real_component
def test_real_skip_in_fixture(daemon):
    pass


@pytest.mark.real_component
def test_real_skip_in_body():
    if shutil.which("no-such-daemon") is None:
        pytest.skip("no-such-daemon not installed")


@pytest.mark.real_component
def test_real_runs():
    pass


@pytest.mark.real_component
@pytest.mark.xfail(reason="known")
def test_real_xfail():
    raise AssertionError


@pytest.mark.skipif(True, reason="needs a GPU")
def test_ordinary_skip():
    pass


def test_ordinary_runs():
    pass
"""


def run_cases(pytester, monkeypatch, ci: str | None):
    if ci is None:
        monkeypatch.delenv("CI", raising=False)
    else:
        monkeypatch.setenv("CI", ci)
    pytester.makepyfile(test_cases=CASES)
    return pytester.runpytest_inprocess("-p", "tests.conftest", "-rA", "-p", "no:cacheprovider")


@pytest.mark.parametrize("ci", [None, "false"])
def test_outside_ci_every_skip_stays_a_skip(pytester, monkeypatch, ci):
    result = run_cases(pytester, monkeypatch, ci)
    result.assert_outcomes(passed=2, skipped=4, xfailed=1)
    assert result.ret == pytest.ExitCode.OK


def test_under_ci_a_skipped_real_component_test_fails_the_run(pytester, monkeypatch):
    result = run_cases(pytester, monkeypatch, "true")
    # a skip in setup (skipif, a fixture's pytest.skip) is reported as an error there, one in the test
    # body as a failure; the xfail and the unmarked skip are untouched
    result.assert_outcomes(passed=2, skipped=1, xfailed=1, errors=2, failed=1)
    assert result.ret == pytest.ExitCode.TESTS_FAILED
    rule = "real-component test skipped under CI=true"
    for line in (f"ERROR*test_real_skipif - {rule}*: pdsh/openssh not installed (pdsh missing)",
                 f"ERROR*test_real_skip_in_fixture - {rule}*: Slurm/munge not installed (slurmd missing)",
                 f"FAILED*test_real_skip_in_body - {rule}*: no-such-daemon not installed"):
        result.stdout.fnmatch_lines([line])  # each names its skip's reason
    result.stdout.fnmatch_lines(["SKIPPED*needs a GPU"])  # the ordinary skip is still one

"""The environment: the lock is what the suite runs in and what setup.cfg admits; the floors setup.cfg claims are no
older than the APIs dpo_ds calls (scripts/test.sh --floors runs the suite on them).
    scripts/test.sh tests/test_install.py
"""
import configparser
import os
import re
from importlib.metadata import version

import pytest
from conftest import ROOT

# the oldest version of each package whose API dpo_ds uses: from_pretrained(dtype=...) in transformers,
# UlyssesSPAttentionHF and the CPU accelerator's gloo path in deepspeed, Dataset.iter(batch_size=) in datasets
API_MINIMUM = {"transformers": (4, 56), "deepspeed": (0, 17), "datasets": (2, 14), "torch": (2, 4)}


def floors():
    cfg = configparser.ConfigParser()
    cfg.read(os.path.join(ROOT, "setup.cfg"))
    for line in cfg["options"]["install_requires"].strip().splitlines():
        name, floor = re.fullmatch(r"([\w-]+)>=([\d.]+)", line.strip()).groups()
        yield name, tuple(int(x) for x in floor.split("."))


def installed(name):
    return tuple(int(x) for x in re.match(r"[\d.]+", version(name)).group().rstrip(".").split("."))


def test_floors_are_tested_versions():
    for name, floor in floors():
        assert floor <= installed(name), f"{name}>={floor} but the suite runs with {version(name)}"
        assert floor[:2] >= API_MINIMUM.get(name, (0,)), f"{name}>={floor} is older than the API dpo_ds calls"


def locked() -> dict:
    """{name: version} of scripts/requirements.lock (names normalised as pip compares them)."""
    with open(os.path.join(ROOT, "scripts", "requirements.lock")) as f:
        pins = [line.strip().split("==") for line in f if re.match(r"[A-Za-z0-9]", line)]
    return {canonical(name): v for name, v in pins}


def canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def test_the_lock_satisfies_setup_cfg():
    """Every requirement setup.cfg states (install_requires, the dev extra) admits the locked version: a lock
    written by scripts/lock.sh from another setup.cfg is caught here."""
    from packaging.requirements import Requirement

    cfg = configparser.ConfigParser()
    cfg.read(os.path.join(ROOT, "setup.cfg"))
    pins = locked()
    for line in (cfg["options"]["install_requires"] + cfg["options.extras_require"]["dev"]).split():
        req = Requirement(line)
        assert canonical(req.name) in pins, f"{req.name} is not in scripts/requirements.lock: run scripts/lock.sh"
        assert req.specifier.contains(pins[canonical(req.name)], prereleases=True), \
            f"{line} but the lock has {pins[canonical(req.name)]}: run scripts/lock.sh"


def test_the_suite_runs_in_the_locked_environment():
    """scripts/test.sh installs the lock and nothing else: each package at its locked version (the project
    itself aside); --latest and --floors run other environments on purpose."""
    import sysconfig
    from importlib.metadata import distributions

    kind = os.environ.get("DPO_DS_INSTALL", "locked")
    if kind != "locked":
        pytest.skip(f"scripts/test.sh --{kind}: not the locked environment, on purpose")
    # the venv's own packages (MLflow's side directory joins sys.path in the --report_to mlflow test)
    have = {canonical(d.metadata["Name"]): d.version for d in distributions(path=[sysconfig.get_paths()["purelib"]])
            if canonical(d.metadata["Name"]) != "dpo-ds"}
    assert have == locked()

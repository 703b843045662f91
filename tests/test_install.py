"""The dependency floors in setup.cfg are versions this suite ran with, and no older than the APIs dpo_ds calls.
    scripts/test.sh tests/test_install.py
"""
import configparser
import os
import re
from importlib.metadata import version

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

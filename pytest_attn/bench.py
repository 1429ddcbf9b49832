# PLACEHOLDER, replaced by the benchmark work (issue 4).
import pytest


@pytest.fixture
def attn_benchmark():
    raise NotImplementedError


def update_machine_info(config, machine_info):
    pass

"""A Serve start that fails stops what it started: one failed start fails one test, never the tests
after it ("Maybe you called ray.init twice")."""

from __future__ import annotations

import os

import pytest
import ray

from longmem.config import LongMemConfig
from services.app import PROXY_READY_ENV, local_service
from tiny import free_port


def test_a_failed_start_leaves_no_ray_instance_behind(tmp_path):
    config = LongMemConfig.from_dict({
        "backbone": {"name_or_path": str(tmp_path / "no-such-model")},
        "serve": {"grpc_port": free_port(), "http_port": free_port(), "storage_uri": str(tmp_path / "storage")},
    })
    preset = os.environ.get(PROXY_READY_ENV)
    with pytest.raises(OSError):  # Serve is up by then; building the application fails on the backbone
        with local_service(config, num_cpus=2):
            pytest.fail("the application started without a backbone")
    assert not ray.is_initialized()
    # what the Serve controller read at its start: the configured proxy ready timeout, unless already set
    assert os.environ[PROXY_READY_ENV] == (preset or str(config.serve.proxy_ready_timeout_s))

"""The deploy, monitor and notify sections of params.yaml: defaults and what they reject."""

from __future__ import annotations

import pytest

from tests.helpers import make_params
from textgate.errors import ConfigError


def test_repository_defaults():
    params = make_params({})
    assert params.deploy.pipeline_cron == "0 2 * * *"
    assert params.deploy.timezone == "UTC"
    assert params.deploy.concurrency_limit == "textgate-pipeline"
    assert params.monitor.request_log is None
    assert params.monitor.min_requests == 200
    assert params.notify.block == "textgate-alerts"


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"deploy": {"pipeline_cron": "nightly"}}, "deploy.pipeline_cron"),
        ({"deploy": {"pipeline_cron": "0 2 * *"}}, "deploy.pipeline_cron"),
        ({"deploy": {"timezone": "Mars/Olympus"}}, "unknown time zone 'Mars/Olympus'"),
        ({"deploy": {"monitor_interval_minutes": 0}}, "deploy.monitor_interval_minutes"),
        ({"monitor": {"min_requests": 0}}, "monitor.min_requests"),
        ({"monitor": {"mmd_p_value": 1.5}}, "monitor.mmd_p_value"),
        ({"monitor": {"mmd_permutations": 50}}, "can never give p < mmd_p_value=0.01"),
        ({"monitor": {"max_abstention_increase": 2}}, "monitor.max_abstention_increase"),
        ({"monitor": {"psi": 0.2}}, "monitor.psi: unknown key"),
        ({"notify": {"block": ""}}, "notify.block"),
    ],
)
def test_bad_values_name_the_key(overrides, message):
    with pytest.raises(ConfigError) as error:
        make_params(overrides)
    assert message in str(error.value)


def test_null_turns_alerts_and_the_global_limit_off():
    params = make_params({"notify": {"block": None}, "deploy": {"concurrency_limit": None}})
    assert params.notify.block is None and params.deploy.concurrency_limit is None

"""bench/switch.py's analysis on made-up traffic: windows, switch time, flapping, targets."""

from __future__ import annotations

from bench.switch import Answer, Traffic, analyse, verdicts


def test_flapping_counts_old_answers_to_requests_sent_after_the_first_new_one() -> None:
    # Promote at t=10, first answer by b at t=12; nothing else changes.
    answers = [Answer(t, t + 0.01, 200, "a") for t in range(0, 12)]
    answers += [Answer(t, t + 0.01, 200, "b") for t in range(12, 30)]
    answers.append(Answer(13.0, 13.02, 200, "a"))  # a, though b had answered: flapping
    answers.append(Answer(25.0, 25.5, 503, "b"))  # an error
    done = [{"action": "promote", "from": "a", "to": "b", "changed": 10.0, "first": 12.01}]
    report = analyse(Traffic(answers=answers), done)
    [switch] = report["switches"]
    assert switch["switch_s"] == 2.01
    assert switch["flapping"] == 1
    assert report["errors"] == 1
    assert switch["starting"]["requests"] == 3  # sent at 10, 11 and 12, before 12.01
    assert switch["within_5s"]["requests"] == 11  # sent 8..17, the flapping one included
    # Steady: sent before 8 or after 17 (the error at 25 included).
    assert report["steady"]["requests"] == 8 + 12 + 1

    full = {"switch": report, "overhead": {"cpu_increase_pct": 3.0}}
    targets = verdicts(full)
    assert not targets["no_errors"] and not targets["no_flapping"]
    assert targets["switch_under_10s"] and targets["cpu_per_request_at_most_5pct_more"]

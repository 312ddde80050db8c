"""A coordinator restarted on a state dir that lost a job's blob: that job fails with a reason, the
coordinator and its other jobs go on."""

from __future__ import annotations

from pathlib import Path

from conftest import Admin, make_spec

from fedtune.coordinator.server import start


def test_a_job_whose_initial_adapter_is_gone_fails_at_restart_and_the_rest_resume(tmp_path: Path) -> None:
    state_dir = tmp_path / "coord"
    running = start(state_dir, "127.0.0.1", 0, insecure=True)
    admin = Admin(running)
    try:
        broken = admin.create_job(make_spec(clients=2))
        # Another rank: its own initial adapter (blobs are content-addressed).
        kept = admin.create_job(make_spec(clients=2).replace("r: 4,", "r: 2,"))
        lost = running.coordinator.state.job(broken).initial_adapter
        assert running.coordinator.state.job(kept).initial_adapter != lost
    finally:
        admin.channel.close()
        running.stop(grace=0.5)
    (state_dir / "blobs" / lost[:2] / lost).unlink()

    running = start(state_dir, "127.0.0.1", 0, insecure=True)  # the coordinator starts all the same
    admin = Admin(running)
    try:
        failed = admin.job(broken)
        assert failed.state == "failed"
        assert "cannot resume" in failed.message and lost in failed.message
        assert admin.job(kept).state == "running"
        assert kept in running.coordinator.engines and broken not in running.coordinator.engines
    finally:
        admin.channel.close()
        running.stop(grace=0.5)

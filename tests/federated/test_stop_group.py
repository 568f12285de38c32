"""``deploy.stop`` ends a started process group with everything in it, also when its leader already exited
(a SuperNode's SuperExec and app processes must not outlive it)."""

from __future__ import annotations

import os
import subprocess
import time

import pytest

from expertkit.federated.deploy import stop


def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    return True


@pytest.mark.parametrize("script", ["sleep 300 & sleep 300", "sleep 300 & exit 0"],
                         ids=["leader-running", "leader-exited"])
def test_stop_ends_the_whole_group(script):
    proc = subprocess.Popen(["bash", "-c", script], start_new_session=True)
    time.sleep(0.3)  # the background child is started
    assert _group_alive(proc.pid)
    stop(proc)
    assert proc.poll() is not None
    assert not _group_alive(proc.pid)  # the child (an orphan once bash exits) is gone too

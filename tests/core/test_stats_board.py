"""vllm_sink.core.stats_board: boards live in a private per-engine directory and are
created exclusively (a planted file or link is never written through)."""

import os
import stat

import pytest

from vllm_sink.core import stats_board as sb

pytestmark = pytest.mark.cpu


def test_board_never_writes_through_a_link(tmp_path):
    target = tmp_path / "victim"
    target.write_bytes(b"precious")
    link = tmp_path / "worker.stats"
    link.symlink_to(target)
    board = sb.StatsBoard(str(link), create=True)
    board.write({"requests": 7})
    assert target.read_bytes() == b"precious"
    info = os.lstat(link)
    assert stat.S_ISREG(info.st_mode) and stat.S_IMODE(info.st_mode) == 0o600
    assert sb.StatsBoard.open(str(link)).read()["requests"] == 7


def test_private_dir_and_its_checks(tmp_path, monkeypatch):
    path = sb.make_private_dir()
    try:
        assert stat.S_IMODE(os.lstat(path).st_mode) == 0o700
        monkeypatch.setenv(sb.STATS_DIR_ENV, path)
        assert sb.board_path("scheduler") == os.path.join(path, "scheduler.stats")
        os.chmod(path, 0o755)
        with pytest.raises(PermissionError, match=sb.STATS_DIR_ENV):
            sb.board_path("scheduler")
    finally:
        os.rmdir(path)
    link = tmp_path / "link"
    link.symlink_to(tmp_path)
    monkeypatch.setenv(sb.STATS_DIR_ENV, str(link))
    with pytest.raises(PermissionError):
        sb.stats_dir()
    monkeypatch.delenv(sb.STATS_DIR_ENV)
    made = sb.stats_dir()  # no frontend named one: a new private one
    try:
        assert os.environ[sb.STATS_DIR_ENV] == made
        assert stat.S_IMODE(os.lstat(made).st_mode) == 0o700
    finally:
        os.rmdir(made)

from __future__ import annotations

from pathlib import Path

import pytest

from tiny import play_text


@pytest.fixture(scope="session")
def calib_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("calib") / "comedy.txt"
    path.write_text(play_text("twelfth-night") + play_text("as-you-like-it"))
    return path

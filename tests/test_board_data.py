"""A board's data folder: empty on a fresh board, looked at again only when its files change."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from edgefl.data import DataSource
from edgefl.errors import DataError
from edgefl.roles.board_data import BoardData, open_board_data


def test_an_empty_folder_is_no_data_yet_and_stray_images_are_an_error(tmp_path: Path) -> None:
    (tmp_path / "cat").mkdir()  # class folders made ahead, no image yet
    assert open_board_data(tmp_path) is None
    Image.fromarray(np.zeros((4, 4, 3), np.uint8)).save(tmp_path / "loose.png")
    with pytest.raises(DataError, match="holds no images"):
        open_board_data(tmp_path)
    with pytest.raises(DataError):
        open_board_data(tmp_path / "missing")  # a typo is still refused


def test_look_offers_the_data_only_when_its_files_changed(tmp_path: Path) -> None:
    seen: list[int] = []

    def use(source: DataSource | None) -> bool:
        seen.append(0 if source is None else len(source))
        return True

    data = BoardData(tmp_path)
    assert data.look(use) and seen == [0]
    assert not data.look(use)  # nothing changed: not even opened
    (tmp_path / "dog").mkdir()
    Image.fromarray(np.zeros((4, 4, 3), np.uint8)).save(tmp_path / "dog" / "1.png")
    assert data.look(use) and seen == [0, 1]
    declined = BoardData(tmp_path)
    assert not declined.look(lambda source: False)
    assert declined.look(use)  # what was not taken is offered again

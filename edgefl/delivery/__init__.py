"""Over-the-air delivery: signed releases, chunked artifacts, the board-side updater, the fleet view
and agent installation on boards."""

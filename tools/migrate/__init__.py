"""python -m tools.migrate: move a running guest to an incoming one (QMP migrate + query-migrate)."""

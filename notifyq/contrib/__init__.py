"""Seams to the frameworks notifyq is used from; each module imports its framework only
where it needs one, and none is a dependency of notifyq."""

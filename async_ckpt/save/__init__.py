"""Saving: the plan, staging, data files, replica digests, and the three roles of a save (rank
worker, node writer, coordinator) that take a staged state to a committed checkpoint."""

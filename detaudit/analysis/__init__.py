"""Divergence analysis over run directories: pure functions of Arrow tables, no I/O besides reading runs."""

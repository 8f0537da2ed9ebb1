"""The qcow2 engine: pure format logic, no I/O (see engine.py)."""

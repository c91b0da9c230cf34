"""The arena: compare recipes across seeds from their run directories.

Submodules (imported explicitly, nothing heavy here): :mod:`tether.arena.runs` (reading run
directories), :mod:`tether.arena.stats` (rliable-style statistics across seeds), and the report,
comparison, executor and evidence modules built on them.
"""

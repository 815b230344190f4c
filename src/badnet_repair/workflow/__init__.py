"""Whole runs on files: the pruning defense (:mod:`.prune`), the comparison of defenses
(:mod:`.compare`), and where the inputs come from (:mod:`.layout`)."""

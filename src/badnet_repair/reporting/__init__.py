"""Reporting: tables and the lab report (:mod:`.report`), figures (:mod:`.plotting`), where a
backdoor lives (:mod:`.analysis`), and the notebook runner (:mod:`.notebook`)."""

"""Training runs read back from their logs (:mod:`.runs`), compared (:mod:`.compare`) and plotted
(:mod:`.plots`, needs matplotlib: import it by name)."""

"""Quality evaluation: greedy outputs per configuration, scored anywhere from the files."""

"""Quality evaluation: greedy outputs per configuration (where the model runs), scored anywhere from the files."""

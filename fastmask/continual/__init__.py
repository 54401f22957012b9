"""Continual fine-tuning of an open_clip CLIP with selective parameter updates (``fastmask continual``).

The job is an ordinary open_clip training loop, split so that each part can be read (and copied)
on its own:

- :mod:`.data`: the embedded digits benchmark, ImageFolder directories, class-incremental task
  splits, the replay buffer;
- :mod:`.model`: the small CLIP of the embedded default, its word tokenizer, its pretraining
  (cached on disk), and loading any open_clip model for real use;
- :mod:`.methods`: how ``spu``, ``spu-original``, ``full`` and ``frozen`` score and train;
- :mod:`.checks`: every setting checked before any work (errors name the flag);
- :mod:`.job`: the loop over seeds, learning rates, methods and tasks; evaluation and metrics;
- :mod:`.report`: the terminal table, the JSON file and the plots.
"""
